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


def stall_summary(events: list[TokenEvent], fault_time: float, arrivals: dict[int, float],
                  requests: set[int] | None = None) -> dict:
  """Stalls caused by a failure at `fault_time` (perf_counter seconds), as the paper defines them.

  The requests the failure held up (optionally only those in `requests`): every request that
  had arrived by the fault and got a token after it (in flight, or admitted and queued with no
  token yet), and every request that arrived after the fault but before service resumed (the
  first token after the fault, from any request): a restart that leaves only queued or newly
  arriving requests waiting stalls them all the same. Recovery ends at R, when each of them has
  delivered a token after the fault.

  Args:
    arrivals: request id -> arrival time (perf_counter seconds) of every request of the run.

  Returns:
    held: how many requests the failure held up (0: nothing waited, every stall is 0).
    service_stall_s: the longest interval with zero output tokens (from any request) while a
      held request waited, that ends after the fault and starts before R.
    max_request_gap_s: the longest wait of one held request across the fault, from its last
      token before the fault (or its arrival, if later) to its next token;
      max_request_stall_s: that gap minus the request's median TBT before the fault (the
      run's, for one with fewer than two tokens before it): the extra wait the failure caused.
    tbt_before_s: median gap between consecutive tokens of a request, before the fault.
    recovered_after_s: R - fault_time.
  """
  by_request: dict[int, list[float]] = {}
  for ev in sorted(events, key=lambda e: (e.request_id, e.index)):
    by_request.setdefault(ev.request_id, []).append(ev.time)
  merged = sorted(ev.time for ev in events)
  resumed = merged[int(np.searchsorted(merged, fault_time, side="right"))] if (
      merged and merged[-1] > fault_time) else float("inf")
  held = {r: (t, arrivals[r]) for r, t in by_request.items()
          if (requests is None or r in requests) and t[-1] > fault_time
          and arrivals[r] <= resumed}
  before = [b - a for t in by_request.values() for a, b in zip(t, t[1:]) if b < fault_time]
  tbt = float(np.median(before)) if before else float("nan")
  out = dict(held=len(held), tbt_before_s=tbt, service_stall_s=0.0,
             max_request_gap_s=0.0, max_request_stall_s=0.0, recovered_after_s=0.0)
  if not held:
    return out
  recovered, waiting_from = 0.0, float("inf")
  for t, arrival in held.values():
    i = int(np.searchsorted(t, fault_time, side="right"))  # first token after the fault
    since = max(t[i - 1], arrival) if i else arrival
    own = [b - a for a, b in zip(t[:i], t[1:i])]
    base = float(np.median(own)) if own else tbt
    gap = t[i] - since
    out["max_request_gap_s"] = max(out["max_request_gap_s"], gap)
    out["max_request_stall_s"] = max(out["max_request_stall_s"],
                                     gap - (0.0 if np.isnan(base) else base))
    recovered, waiting_from = max(recovered, t[i]), min(waiting_from, since)
  out["recovered_after_s"] = recovered - fault_time
  points = [waiting_from] + [x for x in merged if x > waiting_from]
  gaps = [b - a for a, b in zip(points, points[1:]) if b > fault_time and a < recovered]
  out["service_stall_s"] = max(gaps, default=0.0)
  return out
