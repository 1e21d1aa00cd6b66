"""The datapath of one layer across cells, driven from the control plane; failures found in it.

A mixin of `Engine` (it uses the engine's cluster state, detector and recovery). The control
plane sends each worker what to run and whom to expect; the activations go worker to worker
through their data planes (`worker/dataplane.py`), never through here. Each phase is a public
method so that benchmarks can time it alone: `attend` (every AW attends, routes, and sends
each EW its buffer), `run_experts` (every EW runs the buffers it received and sends each AW
its results), `combine` (every AW adds them in). `run_layer` chains them and handles what
goes wrong: a dead or silent AW is left out of the layer and handed to the recovery; the AWs
that had sent tokens to a failed EW, or whose messages were lost, replay the layer (a new
attempt) under the table the recovery installed.
"""

from __future__ import annotations

import time

import numpy as np

from tarragon_jax.worker.fault_domain import WorkerDead

MAX_ATTEMPTS = 4  # replays of one layer for one AW before its missing results stand in as NaN


class LayerExchange:
  """One layer through every worker. Mixed into `Engine`."""

  def _call(self, worker, fn):
    """Calls a worker; None if it is dead or declared failed after staying silent."""
    return self._call_all({0: (worker, fn)})[0]

  def _call_all(self, calls: dict) -> dict:
    """Calls workers ({key: (worker, fn)}) side by side, then collects each one's output.

    An output is None if the worker is dead or was declared failed after staying silent. A
    process runtime's reply (`Pending`) is waited for with the detector: a late reply is
    silence, and the peer is probed.
    """
    started = {}
    for key, (worker, fn) in calls.items():
      since = time.perf_counter()
      try:
        started[key] = (worker, since, fn(worker))
      except WorkerDead:
        self.detector.closed(worker, since)
        started[key] = None
    results = {}
    for key, item in started.items():
      if item is None:
        results[key] = None
        continue
      worker, since, out = item
      if hasattr(out, "arrived"):
        if self.detector.wait({worker.name: (worker, out.arrived)}, since):
          out.ignore()
          out = None
        else:
          out = out.result()
      elif out is None:  # silent: probed, and declared failed (one that answers is waited for)
        self.detector.silent(worker, expected_since=since)
      results[key] = out
    return results

  @property
  def _wait_s(self) -> float:
    """How long a worker waits for a message whose sender has already said it sent it."""
    return self.engine_cfg.resilience.detection.probe_interval_s

  def attend(self, layer: int, attempts: dict[int, int], ews: list[int]) -> dict[int, object]:
    """AWs {a: attempt} attend, route and send their buffers to EWs `ews`; {a: tokens routed
    to each EW, i32[W]}. An AW that is dead or silent past the detection window is handed to
    the recovery and left out."""
    state, S = self.state, self.state.placement.slots_per_layer
    step, num_ew = self.iteration, len(state.ews)
    calls = {a: (state.aws[a], lambda w, n=n: w.attend(step, layer, n, num_ew, S, ews))
             for a, n in attempts.items() if state.slot_owner[a] is not None}
    counts = {}
    for a, out in self._call_all(calls).items():
      if out is None:
        self.recovery.aw_failed(a, layer)
      else:
        counts[a] = out
    return counts

  def run_experts(self, layer: int, attempts: dict[int, int], ews: list[int],
                  capacity: int) -> dict[int, list[int]]:
    """EWs `ews` run the buffers of AWs {a: attempt} and send each its results; {m: the AWs
    whose buffers did not reach m}. EWs that are dead or declared failed are missing."""
    step, num_aw, sources = self.iteration, len(self.state.aws), sorted(attempts.items())
    calls = {m: (self.state.ews[m], lambda w, m=m: w.run_layer(
        step, layer, sources, num_aw, self.ew_slots[m], capacity, self._wait_s)) for m in ews}
    return {m: out for m, out in self._call_all(calls).items() if out is not None}

  def combine(self, layer: int, plan: dict[int, tuple[int, list[int], bool]],
              capacity: int) -> dict[int, list[int]]:
    """AWs {a: (attempt, EWs that ran it, force)} add in their results; {a: EWs whose results
    did not arrive} for the AWs that could not combine (with `force`, those stand in as NaN:
    rows that read them fail)."""
    step, num_ew = self.iteration, len(self.state.ews)
    calls = {a: (self.state.aws[a], lambda w, n=n, ms=ms, f=f: w.combine(
        step, layer, n, ms, num_ew, capacity, self._wait_s, f))
        for a, (n, ms, f) in plan.items() if self.state.slot_owner[a] is not None}
    lost = {}
    for a, out in self._call_all(calls).items():
      if out is None:
        self.recovery.aw_failed(a, layer)
      elif out:
        lost[a] = list(out)
    return lost

  def run_layer(self, layer: int, live: list[int], capacity: int) -> list[int]:
    """One layer across all workers; returns the AWs still live.

    If an EW fails, the AWs that had sent it tokens replay this layer under the new routing
    table (its experts now served by shadows); the others combine what they have. A message
    that never arrived (its sender died after saying it sent it) makes its AW replay too.
    """
    attempts = {a: 0 for a in live}
    todo = list(live)
    while todo:
      ews = self.state.live_ews()
      counts = self.attend(layer, {a: attempts[a] for a in todo}, ews)
      ran = self.run_experts(layer, {a: attempts[a] for a in counts}, ews, capacity)
      failed = [m for m in ews if m not in ran]
      again = {a for lost in ran.values() for a in lost}
      if failed:
        again |= {a for a in counts if np.asarray(counts[a])[failed].any()}
        self.recovery.ews_failed(failed, layer)
      last = {a for a in counts if attempts[a] + 1 >= MAX_ATTEMPTS}  # no more replays
      again -= last
      lost = self.combine(layer, {a: (attempts[a], list(ran), a in last) for a in counts
                                  if a not in again}, capacity)
      for ms in lost.values():  # results that never came: a sender whose process is gone
        gone = [m for m in ms if m not in self.state.failed_ews
                and self.state.ews[m].disconnected()]
        for m in gone:
          self.detector.closed(self.state.ews[m], time.perf_counter())
        if gone:
          self.recovery.ews_failed(gone, layer)
      again |= set(lost)
      todo = sorted(a for a in again if self.state.slot_owner[a] is not None)
      if todo:
        self.timeline.add("replay", layer=layer, aws=todo, failed_ews=failed)
        for a in todo:
          attempts[a] += 1
    return [a for a in live if self.state.slot_owner[a] is not None]
