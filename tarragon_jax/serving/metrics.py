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
                  declared_at: float | None = None, requests: set[int] | None = None) -> dict:
  """Stalls caused by a failure at `fault_time` (perf_counter seconds), as the paper defines them.

  A *wait* of a request is the time from one of its events to the next: from its arrival (or
  its previous token) to its next token. A wait belongs to the failure if it ends after the
  fault and begins before the failure is over: the later of its worker's declaration
  (`declared_at`) and the moment every request waiting at the fault (in flight, or admitted and
  queued) has got a token after it. So every request the failure held up counts, not only those in
  flight: a restart that leaves only queued requests, or ones that arrive before the failure
  is found, waiting stalls them all the same. Optionally only `requests`.

  Args:
    arrivals: request id -> arrival time (perf_counter seconds) of every request of the run.
    declared_at: when the failed worker was declared (None: the fault's time).

  Returns:
    held: how many requests had a wait that belongs to the failure (0: every stall is 0).
    service_stall_s: the longest time no token was delivered (to any request) while a request
      waited a wait that belongs to the failure.
    max_request_gap_s: the longest such wait; max_request_stall_s: the longest part of one
      that the failure caused: a wait for a next token beyond the request's median TBT before
      the fault (the run's, if it had none); a wait for a first token after the fault.
    tbt_before_s: median TBT over the run before the fault.
    recovered_after_s: when the last such wait ended, minus `fault_time`.
  """
  by_request: dict[int, list[float]] = {}
  for ev in sorted(events, key=lambda e: (e.request_id, e.index)):
    by_request.setdefault(ev.request_id, []).append(ev.time)
  merged = np.sort(np.array([ev.time for ev in events]))
  before = [b - a for t in by_request.values() for a, b in zip(t, t[1:]) if b < fault_time]
  tbt = float(np.median(before)) if before else float("nan")
  out = dict(held=0, tbt_before_s=tbt, service_stall_s=0.0,
             max_request_gap_s=0.0, max_request_stall_s=0.0, recovered_after_s=0.0)

  def waits(r: int) -> list[tuple[float, float, float]]:
    """(start, end, the part the failure caused) of each wait of `r` that ends after the
    fault: of a wait for a next token, its length beyond the request's usual gap; of a wait
    from its arrival, the part after the fault (a queue before it is not the failure's)."""
    t, arrival = by_request[r], arrivals[r]
    own = [b - a for a, b in zip(t, t[1:]) if b < fault_time]
    usual = float(np.median(own)) if own else tbt
    usual = 0.0 if np.isnan(usual) else usual
    out = [] if t[0] <= fault_time else [(arrival, t[0], t[0] - max(arrival, fault_time))]
    return out + [(a, b, b - a - usual) for a, b in zip(t, t[1:]) if b > fault_time]

  mine = {r: waits(r) for r in by_request if requests is None or r in requests}
  # The failure is over once its worker was declared and every request waiting at the fault
  # (in flight or queued) got a token after it.
  known = fault_time if declared_at is None else max(fault_time, declared_at)
  known = max([known, *(ws[0][1] for ws in mine.values() if ws and ws[0][0] <= fault_time)])
  held = {r: [w for w in ws if w[0] < known] for r, ws in mine.items()}
  held = {r: ws for r, ws in held.items() if ws}
  out["held"] = len(held)
  recovered = fault_time
  for a, b, caused in (w for ws in held.values() for w in ws):
    out["max_request_gap_s"] = max(out["max_request_gap_s"], b - a)
    out["max_request_stall_s"] = max(out["max_request_stall_s"], caused)
    recovered = max(recovered, b)
    # The longest stretch of this wait, after the fault, in which nobody got a token.
    inside = merged[np.searchsorted(merged, a, "right"):np.searchsorted(merged, b, "right")]
    points = np.concatenate([[a], inside])
    ends_after = points[1:] > fault_time
    out["service_stall_s"] = max(out["service_stall_s"],
                                 float(np.max(np.diff(points)[ends_after])))
  out["recovered_after_s"] = recovered - fault_time
  return out


def fault_stalls(events: list[TokenEvent], timeline,
                 arrivals: dict[int, float]) -> list[tuple[dict, dict]]:
  """(fault event, its `stall_summary`) for every fault on `timeline`.

  Faults fired in the same engine step are one failure: each one's stall is measured with the
  last declaration of any of their workers (a fault whose worker was not running, or not yet
  declared, takes its companions')."""
  declared, faults = timeline.of("declared_failed"), timeline.of("fault")
  found = [min((d["t"] for d in declared if d["worker"] == f["worker"] and d["t"] >= f["t"]),
               default=None) for f in faults]
  out = []
  for f in faults:
    when = [t for g, t in zip(faults, found) if g.get("step") == f.get("step") and t is not None]
    out.append((f, stall_summary(events, f["t"], arrivals, max(when, default=None))))
  return out
