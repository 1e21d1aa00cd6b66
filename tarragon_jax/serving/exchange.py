"""A step across all workers, and one layer of it driven from the control plane; failures found
in it.

A mixin of `Engine` (it uses the engine's cluster state, detector and recovery). The control
plane sends each worker what to run and whom to expect; the activations go worker to worker
through their data planes (`worker/dataplane.py`), never through here. Each phase is a public
method so that benchmarks can time it alone: `attend` (every AW attends, routes, and sends
each EW its buffer), `run_experts` (every EW runs the buffers it received and sends each AW
its results), `combine` (every AW adds them in). `run_layer` chains them and handles what
goes wrong: a dead or silent AW is left out of the layer and handed to the recovery; the AWs
that had sent tokens to a failed EW, or whose messages were lost, replay the layer (a new
attempt) under the table the recovery installed.

`run_step` runs a whole step: layer by layer as above where the workers are cooperative (the
local runtime), or, where each worker is its own process, with one message to each worker
that then runs the step's layers by itself (`_run_autonomous`); `run_layer` is then only the
way a step that met a failure is finished.
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

  def _collect(self, started: dict, on_failed=None, arrivals: dict | None = None) -> dict:
    """The outputs of `_issue`d calls. An output is None if the worker is dead or was declared
    failed after staying silent. A process runtime's replies (`Pending`) are waited for
    together with the detector, blocking on their sockets: a late reply is silence, and the
    peer is probed. `on_failed(name)`: called as soon as a worker waited for is failed.
    `arrivals`: filled with {worker name: when its reply was seen}."""
    replies = {key: item for key, item in started.items()
               if item is not None and hasattr(item[2], "wait_any")}
    failed = set()
    if replies:
      pendings = [out for _, _, out in replies.values()]

      def arrived(name, out):
        if not out.arrived():
          return False
        if arrivals is not None:
          arrivals.setdefault(name, time.perf_counter())
        return True

      failed = set(self.detector.wait(
          {w.name: (w, lambda n=w.name, out=out: arrived(n, out))
           for w, _, out in replies.values()},
          min(since for _, since, _ in replies.values()),
          block=lambda timeout_s: type(pendings[0]).wait_any(pendings, timeout_s),
          on_failed=on_failed))
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

  def run_layer(self, layer: int, live: list[int], capacity: int,
                first_attempt: int = 0) -> list[int]:
    """One layer across all workers; returns the AWs still live.

    The three phases are issued at once: the workers wait for each other's messages, the
    control plane only for the replies. An AW declared failed is cancelled at the EWs (they
    go on without its buffer); an EW declared failed is cancelled at the AWs, and those that
    had routed tokens to it replay the layer under the new routing table (its experts now
    served by shadows) while the others combine what they have. A message that never arrived
    makes its AW replay too. Attempts count from `first_attempt` (1 where a worker's own run
    of the step already used attempt 0's tags), at most `MAX_ATTEMPTS` of them.
    """
    attempts = {a: first_attempt for a in live}
    todo = list(live)
    step = self.iteration
    while todo:
      ews = self.state.live_ews()
      now = {a: attempts[a] for a in todo}
      last = {a for a in todo if attempts[a] + 1 - first_attempt >= MAX_ATTEMPTS}  # no replays
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

  # -- a whole step --------------------------------------------------------------------------

  def run_step(self, seq: int, live: list[int], batches: list, T: int) -> dict[int, tuple]:
    """Step `seq` of AWs `live` (each with its batch: tokens, n_new, fresh, rows); returns
    {a: (tokens i32[B], KV segment or None)} for the AWs that finished it (the others were
    declared failed and handed to the recovery)."""
    capacity = self.engine_cfg.slots_per_aw * T * self.cfg.top_k
    if self.runtime.autonomous:
      return self._run_autonomous(seq, live, batches, capacity)
    begun = self._call_all({a: (self.state.aws[a], lambda w, a=a: w.begin(seq, *batches[a][:3]))
                            for a in live})
    for a, out in begun.items():
      if out is None:
        self.recovery.aw_failed(a, 0)
        live.remove(a)
    for layer in range(self.cfg.num_layers):
      self._fire_faults(layer)
      self.recovery.poll()
      self.recovery.probe_idle()
      live = self.run_layer(layer, live, capacity)
    return self._sample(live, batches)

  def _sample(self, live: list[int], batches: list) -> dict[int, tuple]:
    outs = self._call_all({a: (self.state.aws[a], lambda w, a=a: w.sample(
        *self._sampling_arrays(batches[a][3]))) for a in live})
    for a, out in outs.items():
      if out is None:
        self.recovery.aw_failed(a, self.cfg.num_layers)
    return {a: out for a, out in outs.items() if out is not None}

  def _run_autonomous(self, seq: int, live: list[int], batches: list,
                      capacity: int) -> dict[int, tuple]:
    """The step as the workers run it by themselves: one message to each AW (`run_step`) and
    to each EW (`serve_step`), all issued at once; activations go between them directly.

    A worker declared failed while the others run is cancelled at once at its peers (they
    stop waiting for its messages; a killed one's peers see its port refuse even sooner). Then
    the recovery runs, and the AWs that stopped at a failed EW finish the step layer by layer
    from the control plane, replaying the layer they stopped at (as `run_layer` does). An AW
    that finishes sends its KV to the snapshot store itself; the store's `log_step` then
    names the sender instead of carrying the KV.
    """
    state, layers = self.state, self.cfg.num_layers
    self._fire_faults(0)
    self.recovery.poll()
    self.recovery.probe_idle()
    live = [a for a in live if state.slot_owner[a] is not None]
    ews = state.live_ews()
    num_ew, S = len(state.ews), state.placement.slots_per_layer
    kv_to = getattr(state.store, "address", None)  # (None: no store, or not started yet)
    calls = {state.aws[a].name: (state.aws[a], lambda w, a=a: w.run_step(
        seq, batches[a][:3], self._sampling_arrays(batches[a][3]), num_ew, S, ews, capacity,
        self._wait_s, kv_to)) for a in live}
    calls.update({state.ews[m].name: (state.ews[m], lambda w, m=m: w.serve_step(
        seq, live, len(state.aws), self.ew_slots[m], capacity, self._wait_s)) for m in ews})
    started = self._issue(calls)
    for layer in range(1, layers):  # (they land while the workers run the step)
      self._fire_faults(layer)

    def release(name: str):  # its peers wait no more for any of its messages of this step
      peers = [f"ew{m}" for m in ews] if name.startswith("aw") else [f"aw{a}" for a in live]
      self._cancel([(p, seq, layer, 0, name) for p in peers for layer in range(layers)])

    arrivals = {}
    outs = self._collect(started, on_failed=release, arrivals=arrivals)
    missed = {}  # AW -> the first layer whose buffer from it an EW did not get
    for m in ews:
      for layer, a, _ in outs[f"ew{m}"] or ():
        missed[a] = min(layer, missed.get(a, layers))
    failed = [m for m in ews if outs[f"ew{m}"] is None]
    stopped = {a: out[1] for a in live if (out := outs[f"aw{a}"]) and out[0] == "stopped"}
    if missed or failed or stopped or len(arrivals) < len(calls):
      self._log_replies(seq, outs, arrivals)
    if failed:
      self.recovery.ews_failed(failed, min(stopped.values(), default=0))
    done = {}
    for a in live:
      out = outs[f"aw{a}"]
      if out is None:
        self.recovery.aw_failed(a, missed.get(a, 0))
      elif out[0] == "done":  # its KV went to the store directly: the store is told whence
        done[a] = (out[1], {"from": state.aws[a].address} if isinstance(out[2], str) else out[2])
    if stopped:
      self.timeline.add("replay", layer=min(stopped.values()), aws=sorted(stopped),
                        failed_ews=failed)
    todo = [a for a in stopped if state.slot_owner[a] is not None]
    for layer in range(min(stopped.values(), default=layers), layers):
      now = [a for a in todo if stopped[a] <= layer]  # (attempt 0 was the step's own)
      ran = set(self.run_layer(layer, now, capacity, first_attempt=1))
      todo = [a for a in todo if a not in now or a in ran]
    done.update(self._sample(todo, batches))
    return done

  def _log_replies(self, seq: int, outs: dict, arrivals: dict):
    """Into the timeline, for a step that went wrong: when each worker's reply came (`t_reply`,
    on the detector's clock) and what it said, so that who waited on whom can be read off."""
    for name, out in outs.items():
      if out is None:
        said = "failed"
      elif name.startswith("aw"):
        said = "done" if out[0] == "done" else f"stopped at layer {out[1]}, lost EWs {out[2]}"
      else:
        said = [{"layer": layer, "aw": a, "why": why} for layer, a, why in out]
      self.timeline.add("step_reply", worker=name, step=seq, t_reply=arrivals.get(name),
                        said=said)
