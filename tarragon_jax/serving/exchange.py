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

from tarragon_jax.worker.fault_domain import WorkerDead

MAX_ATTEMPTS = 4  # replays of one layer for one AW before its missing results stand in as NaN


class LayerExchange:
  """One layer through every worker. Mixed into `Engine`."""

  def _call(self, worker, fn):
    """Calls a worker; None if it is dead or declared failed after staying silent."""
    return self._call_all({0: (worker, fn)})[0]

  def _call_all(self, calls: dict) -> dict:
    """Calls workers ({key: (worker, fn)}) side by side, then collects each one's output."""
    return self._collect(self._issue(calls))

  def _issue(self, calls: dict) -> dict:
    """Starts calls ({key: (worker, fn)}) without waiting for their replies (`_collect`)."""
    started = {}
    for key, (worker, fn) in calls.items():
      since = time.perf_counter()
      try:
        started[key] = (worker, since, fn(worker))
      except WorkerDead:
        self.detector.closed(worker, since)
        started[key] = None
    return started

  def _collect(self, started: dict) -> dict:
    """The outputs of `_issue`d calls. An output is None if the worker is dead or was declared
    failed after staying silent. A process runtime's replies (`Pending`) are waited for
    together with the detector, blocking on their sockets: a late reply is silence, and the
    peer is probed."""
    replies = {key: item for key, item in started.items()
               if item is not None and hasattr(item[2], "wait_any")}
    failed = set()
    if replies:
      pendings = [out for _, _, out in replies.values()]
      failed = set(self.detector.wait(
          {w.name: (w, out.arrived) for w, _, out in replies.values()},
          min(since for _, since, _ in replies.values()),
          block=lambda timeout_s: type(pendings[0]).wait_any(pendings, timeout_s)))
    results = {}
    for key, item in started.items():
      if item is None:
        results[key] = None
        continue
      worker, since, out = item
      if key in replies:
        if worker.name in failed:
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
    """How long a worker waits for a message before it gives its sender up. It is a backstop:
    a worker stops waiting as soon as the sender's process is gone, or the control plane,
    having declared the sender failed, says so (`_cancel`)."""
    return self.engine_cfg.resilience.detection.deadline_s

  def _cancel(self, messages: list[tuple[str, int, int, int, str]]):
    """Tells receivers that messages will not come: (receiver, step, layer, attempt, sender)."""
    self.control_link.send([(to, (step, layer, n, sender), None)
                            for to, step, layer, n, sender in messages])

  def attend(self, layer: int, attempts: dict[int, int], ews: list[int]) -> dict:
    """Issues: AWs {a: attempt} attend, route and send their buffers to EWs `ews`. Its
    `_collect`: {a: tokens routed to each EW, i32[W], or None}."""
    state, S = self.state, self.state.placement.slots_per_layer
    step, num_ew = self.iteration, len(state.ews)
    return self._issue({a: (state.aws[a], lambda w, n=n: w.attend(step, layer, n, num_ew, S, ews))
                        for a, n in attempts.items() if state.slot_owner[a] is not None})

  def run_experts(self, layer: int, attempts: dict[int, int], ews: list[int],
                  capacity: int) -> dict:
    """Issues: EWs `ews` run the buffers of AWs {a: attempt} and send each its results. Its
    `_collect`: {m: the AWs whose buffers did not reach m, or None}."""
    step, num_aw, sources = self.iteration, len(self.state.aws), sorted(attempts.items())
    return self._issue({m: (self.state.ews[m], lambda w, m=m: w.run_layer(
        step, layer, sources, num_aw, self.ew_slots[m], capacity, self._wait_s)) for m in ews})

  def combine(self, layer: int, attempts: dict[int, int], ews: list[int], capacity: int,
              last: set[int]) -> dict:
    """Issues: AWs {a: attempt} add in the results of EWs `ews` (those in `last` even if some
    never come: they stand in as NaN, and rows that read them fail). Its `_collect`: {a: the
    EWs whose results it needed and did not get (nothing combined), or None}."""
    step, num_ew = self.iteration, len(self.state.ews)
    return self._issue({a: (self.state.aws[a], lambda w, n=n, f=a in last: w.combine(
        step, layer, n, ews, num_ew, capacity, self._wait_s, f))
        for a, n in attempts.items() if self.state.slot_owner[a] is not None})

  def run_layer(self, layer: int, live: list[int], capacity: int) -> list[int]:
    """One layer across all workers; returns the AWs still live.

    The three phases are issued at once: the workers wait for each other's messages, the
    control plane only for the replies. An AW declared failed is cancelled at the EWs (they
    go on without its buffer); an EW declared failed is cancelled at the AWs, and those that
    had routed tokens to it replay the layer under the new routing table (its experts now
    served by shadows) while the others combine what they have. A message that never arrived
    makes its AW replay too.
    """
    attempts = {a: 0 for a in live}
    todo = list(live)
    step = self.iteration
    while todo:
      ews = self.state.live_ews()
      now = {a: attempts[a] for a in todo}
      last = {a for a in todo if attempts[a] + 1 >= MAX_ATTEMPTS}  # no more replays
      issued = (self.attend(layer, now, ews), self.run_experts(layer, now, ews, capacity),
                self.combine(layer, now, ews, capacity, last))
      for a, out in self._collect(issued[0]).items():
        if out is None:
          self._cancel([(f"ew{m}", step, layer, now[a], f"aw{a}") for m in ews])
          self.recovery.aw_failed(a, layer)
      ran = {m: out for m, out in self._collect(issued[1]).items() if out is not None}
      failed = [m for m in ews if m not in ran]
      if failed:
        self._cancel([(f"aw{a}", step, layer, now[a], f"ew{m}") for a in now for m in failed])
        self.recovery.ews_failed(failed, layer)
      again = set()
      for a, out in self._collect(issued[2]).items():
        if out is None:
          self.recovery.aw_failed(a, layer)
        elif out:
          again.add(a)
      todo = sorted(a for a in again if self.state.slot_owner[a] is not None)
      if todo:
        self.timeline.add("replay", layer=layer, aws=todo, failed_ews=failed)
        for a in todo:
          attempts[a] += 1
    return [a for a in live if self.state.slot_owner[a] is not None]
