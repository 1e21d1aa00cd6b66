"""The datapath of one layer across cells, with failure detection inside the exchange.

A mixin of `Engine` (it uses the engine's workers, routing tables, transfers, detector and
recovery policy). Each phase is a public method so that benchmarks can time it alone:
`attend` (AWs), `send_to_experts`, `run_experts` (EWs), `send_to_attention`, `combine` (AWs);
`run_layer` chains them and handles failures: a dead or silent AW is left out of the layer
and handed to the recovery; a failed EW's tokens are replayed to its shadows.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from tarragon_jax.worker.fault_domain import WorkerDead


class LayerExchange:
  """One layer through every worker. Mixed into `Engine`."""

  def attend(self, layer: int, live: list[int]) -> dict[int, tuple]:
    """Each live AW: attention, routing, per-EW buffers. Returns {aw: (buffers, locals)}.

    An AW that is dead or silent past the detection window is handed to the recovery and
    left out (the EWs stop waiting for it at this layer).
    """
    num_ew, S = len(self.state.ews), self.state.placement.slots_per_layer
    calls = {a: (self.state.aws[a],
                 lambda w, a=a: w.attend(layer, self.active_tables[a], num_ew, S))
             for a in live if self.state.slot_owner[a] is not None}  # (None: declared meanwhile)
    packed = {}
    for a, out in self._call_all(calls).items():
      if out is None:
        self.recovery.aw_failed(a, layer)
      else:
        packed[a] = out
    return packed

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

  def send_to_experts(self, packed: dict[int, tuple], capacity: int) -> list[list | None]:
    """Buffers to the EWs; inbox[m][a] is AW a's packed buffer for EW m (None: EW failed)."""
    ews = self.state.live_ews()
    inbox: list[list | None] = [None] * len(self.state.ews)
    for m in ews:
      inbox[m] = [self.state.ews[m].empty_buffer(capacity) for _ in self.state.aws]
    keys = [(m, a) for a in packed for m in ews]
    sent = self.transfers.send_many(
        [(packed[a][0][m], self.state.ews[m].cell.replicated()) for m, a in keys])
    for (m, a), buf in zip(keys, sent):
      inbox[m][a] = buf
    return inbox

  def run_experts(self, layer: int, inbox: list[list | None]) -> dict[int, tuple]:
    """Each live EW: one batched expert call over all AWs' buffers; {m: results[a]}.

    EWs that are dead or declared failed are missing from the result.
    """
    calls = {m: (ew, lambda w, m=m: w.run_layer(layer, inbox[m], self.ew_slots[m]))
             for m, ew in enumerate(self.state.ews) if inbox[m] is not None}
    return {m: out for m, out in self._call_all(calls).items() if out is not None}

  def send_to_attention(self, results: dict[int, tuple], aws: Iterable[int],
                        capacity: int) -> dict[int, list]:
    """Results back to the AWs; outbox[a][m] is EW m's output for AW a (NaN if none: a token
    routed to an EW that sent nothing fails its request, see `AttentionWorker.missing`)."""
    keys = [(a, m) for m in results for a in aws]
    sent = self.transfers.send_many(
        [(results[m][a], self.state.aws[a].cell.replicated()) for a, m in keys])
    outbox = {a: [self.state.aws[a].missing(capacity)] * len(self.state.ews) for a in aws}
    for (a, m), out in zip(keys, sent):
      outbox[a][m] = out
    return outbox

  def combine(self, layer: int, outbox: dict[int, list]):
    calls = {a: (self.state.aws[a], lambda w, r=results: w.combine(layer, r))
             for a, results in outbox.items()}
    for a, out in self._call_all(calls).items():
      if out is None:
        self.recovery.aw_failed(a, layer)

  def run_layer(self, layer: int, live: list[int], capacity: int) -> list[int]:
    """One layer across all workers, dispatched asynchronously; returns the AWs still live.

    If an EW fails, the AWs that had sent it tokens replay this layer's exchange under the new
    routing table (its experts now served by shadows); the replay is dispatched at once, ahead
    of any later work. Other AWs keep the results they already have.
    """
    pending = self.attend(layer, live)
    live = list(pending)
    num_ew, S = len(self.state.ews), self.state.placement.slots_per_layer
    outbox: dict[int, list] = {}
    while pending:
      results = self.run_experts(layer, self.send_to_experts(pending, capacity))
      failed = [m for m in self.state.live_ews() if m not in results]
      affected = set()
      if failed:
        affected = {a for a in pending if np.asarray(pending[a][1])[failed].any()}
        self.recovery.ews_failed(failed, layer)
      outbox.update(self.send_to_attention(results, [a for a in pending if a not in affected],
                                           capacity))
      pending = {}
      if affected:
        self.timeline.add("replay", layer=layer, aws=sorted(affected), failed_ews=failed)
        for a in sorted(affected):
          out = self._call(self.state.aws[a], lambda w, a=a: w.replay(layer, self.active_tables[a],
                                                                   num_ew, S))
          if out is None:
            self.recovery.aw_failed(a, layer)
            live.remove(a)
          else:
            pending[a] = out
    self.combine(layer, {a: outbox[a] for a in live})
    return live
