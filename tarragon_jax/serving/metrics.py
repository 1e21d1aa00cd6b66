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
