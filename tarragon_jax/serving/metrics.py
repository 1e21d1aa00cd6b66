"""Serving metrics: compile counting, per-token timestamps and latency summaries."""

from __future__ import annotations

import dataclasses
import threading

import jax
import numpy as np

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts XLA backend compilations in this process from the moment it is created."""

  def __init__(self):
    self._lock = threading.Lock()
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **_):
    if event == _COMPILE_EVENT:
      with self._lock:
        self.count += 1


_COUNTER: CompileCounter | None = None


def compile_count() -> int:
  """XLA compilations since the first call of this function in the process."""
  global _COUNTER
  if _COUNTER is None:
    _COUNTER = CompileCounter()
  return _COUNTER.count


@dataclasses.dataclass(frozen=True)
class TokenEvent:
  request_id: int
  index: int  # position of the token in the request's output stream
  token: int
  time: float  # seconds, time.perf_counter()


def percentile(values, q: float) -> float:
  return float(np.percentile(values, q)) if len(values) else float("nan")


def latency_summary(arrivals: dict[int, float], events: list[TokenEvent]) -> dict:
  """TTFT, TBT (p50/p95), output tokens and throughput from token events."""
  by_request: dict[int, list[float]] = {}
  for ev in sorted(events, key=lambda e: (e.request_id, e.index)):
    by_request.setdefault(ev.request_id, []).append(ev.time)
  ttft = [times[0] - arrivals[r] for r, times in by_request.items() if r in arrivals]
  tbt = [b - a for times in by_request.values() for a, b in zip(times, times[1:])]
  span = (max(e.time for e in events) - min(arrivals.values())) if events else float("nan")
  return dict(
      output_tokens=len(events),
      throughput_tok_s=len(events) / span if events and span > 0 else 0.0,
      ttft_p50_s=percentile(ttft, 50), ttft_p95_s=percentile(ttft, 95),
      tbt_p50_s=percentile(tbt, 50), tbt_p95_s=percentile(tbt, 95),
  )


def stall_summary(events: list[TokenEvent], fault_time: float,
                  requests: set[int] | None = None) -> dict:
  """Stalls caused by a failure at `fault_time` (perf_counter seconds), as the paper defines them.

  The requests in flight at the fault are those with a token before it and a token after it
  (optionally only those in `requests`). Recovery ends at R, when each of them has delivered a
  new token.

  Returns:
    service_stall_s: the longest interval with zero output tokens (from any request) that
      ends after the fault and starts before R.
    max_request_gap_s: the longest gap between consecutive tokens of one in-flight request
      across the fault; max_request_stall_s: that gap minus the request's median TBT before
      the fault (the extra wait the failure caused).
    tbt_before_s: median gap between consecutive tokens of a request, before the fault.
    recovered_after_s: R - fault_time.
  """
  by_request: dict[int, list[float]] = {}
  for ev in sorted(events, key=lambda e: (e.request_id, e.index)):
    by_request.setdefault(ev.request_id, []).append(ev.time)
  in_flight = {r: t for r, t in by_request.items()
               if t[0] < fault_time < t[-1] and (requests is None or r in requests)}
  before = [b - a for t in by_request.values() for a, b in zip(t, t[1:]) if b < fault_time]
  tbt = float(np.median(before)) if before else float("nan")
  out = dict(in_flight=len(in_flight), tbt_before_s=tbt, service_stall_s=0.0,
             max_request_gap_s=0.0, max_request_stall_s=0.0, recovered_after_s=0.0)
  if not in_flight:
    return out
  recovered = 0.0
  for t in in_flight.values():
    i = int(np.searchsorted(t, fault_time))  # first token after the fault
    gap = t[i] - t[i - 1]
    own = [b - a for a, b in zip(t[:i], t[1:i])]
    base = float(np.median(own)) if own else tbt
    out["max_request_gap_s"] = max(out["max_request_gap_s"], gap)
    out["max_request_stall_s"] = max(out["max_request_stall_s"], gap - base)
    recovered = max(recovered, t[i])
  out["recovered_after_s"] = recovered - fault_time
  merged = sorted(ev.time for ev in events)
  gaps = [b - a for a, b in zip(merged, merged[1:]) if b > fault_time and a < recovered]
  out["service_stall_s"] = max(gaps, default=0.0)
  return out
