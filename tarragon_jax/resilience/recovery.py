"""`Recovery`: carries out the recovery policy's decisions on the cluster's state.

The control plane (`Engine`) hands `Recovery` what its detector declares (workers failed, the
store failed) and calls it at step and layer boundaries. `Recovery` fences a declared worker at
once (fail-stop: it is never talked to again), asks the policy (`resilience/policy.py`) what to
do with the event, and applies the actions it returns to the `ClusterState`: requests
requeued or failed, routing tables installed, replacements built (`Replacements`) and joined,
the snapshot store restarted, or the whole cluster restarted (`restart_all`).

It also owns what every policy relies on: fault injection, probing idle members, the snapshot
store's watchdog and restart (a new store gets every live request's KV; one that cannot start
is tried again later, and serving never waits for it), and per-request restore from the store.
"""

from __future__ import annotations

import importlib
import os
import time

from tarragon_jax.resilience.cluster_state import ClusterState
from tarragon_jax.resilience.faults import Fault
from tarragon_jax.resilience.global_restart import GlobalRestart
from tarragon_jax.resilience.policy import (
  Action,
  AwaitReplacements,
  Event,
  FailRequests,
  Join,
  RecoveryPolicy,
  Replace,
  ReplacementFailed,
  ReplacementReady,
  Requeue,
  Reroute,
  RestartAll,
  StartStore,
  StoreFailed,
  WorkersFailed,
)
from tarragon_jax.resilience.replacements import Build, Replacements
from tarragon_jax.resilience.restart import restart_all
from tarragon_jax.resilience.snapshot_store import SnapshotStore
from tarragon_jax.resilience.tarragon import Tarragon
from tarragon_jax.worker.fault_domain import FaultDomain, Health, WorkerDead
from tarragon_jax.worker.requests import Phase, RequestState

STORE_RETRY_S = 1.0  # a store that could not be started is tried again this much later
POLICIES = {"tarragon": Tarragon, "global_restart": GlobalRestart}


def policy_class(name: str) -> type[RecoveryPolicy]:
  """The policy a `ResilienceConfig.recovery` value names: a built-in name, or
  "package.module:ClassName" for one of your own (a `RecoveryPolicy` subclass).

  Raises:
    ValueError: no such policy.
  """
  if name in POLICIES:
    return POLICIES[name]
  use = f"use one of {sorted(POLICIES)} or 'package.module:ClassName'"
  module, _, attr = name.partition(":")
  if not module or not attr:
    raise ValueError(f"ResilienceConfig.recovery={name!r} is not a built-in policy; {use}")
  try:
    cls = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as err:
    raise ValueError(f"ResilienceConfig.recovery={name!r}: no such policy ({err}); {use}") \
        from err
  if not (isinstance(cls, type) and issubclass(cls, RecoveryPolicy)):
    raise ValueError(f"ResilienceConfig.recovery={name!r} is not a RecoveryPolicy subclass")
  return cls


class Recovery:
  """Applies `policy`'s actions to `engine.state` (the engine: the control plane)."""

  class Restart(Exception):
    """Raised inside a step when the policy restarts everything; the engine then calls
    `restart` outside the step's exchange."""

    def __init__(self, action: RestartAll):
      super().__init__("restart everything")
      self.action = action

  def __init__(self, engine, policy: RecoveryPolicy):
    self.e, self.policy = engine, policy
    self.replacements = Replacements(engine)
    self._deferred: list[tuple[str, int, int]] = []  # Replace(defer): (kind, index, iteration)
    self._ready: dict[tuple[str, int], Build] = {}  # built, offered to the policy to Join
    self._orphans: dict[int, list[int]] = {}  # fenced AW -> its requests not yet requeued
    self._event: Event | None = None  # the event whose actions are being applied
    self._pending_loss: dict[str, int] = {}
    self._store_gen = 0
    self._base_pending = False
    self._store_retry_at: float | None = None  # when to try starting a store again
    self._store_synced: tuple | None = None  # (store, mark) it was last seen caught up to
    self._last_probe = 0.0
    self.restores: list[dict] = []
    self.restarts: list[dict] = []

  @property
  def state(self) -> ClusterState:
    return self.e.state

  @property
  def recovering(self) -> bool:
    """Whether repair is under way (replacements coming, or requests waiting to be restored)."""
    e = self.e
    return bool(self.state.coming) or any(e.requests[r].restore for r in e.waiting)

  @property
  def aw_coming(self) -> bool:
    """Whether a replacement AW is coming (requests may wait for it)."""
    return any(kind == "aw" for kind, _ in self.state.coming)

  # -- declarations, and the policy's actions --------------------------------------------------

  def aw_failed(self, a: int, layer: int):
    """AW `a` was declared failed at `layer`: fenced, its requests held for the policy."""
    e, state = self.e, self.state
    if state.slot_owner[a] is None:
      return
    self.fence(state.aws[a])
    rids = state.requests_on(a)
    state.slot_owner[a] = None
    for r in rids:
      s = e.requests[r]
      if not s.restore:  # (a request whose restore failed keeps what it had lost first)
        s.lost_layer, s.failed_at = layer, (s.cached, len(s.feed))
      s.phase = Phase.WAITING
    self._orphans[a] = rids
    e.timeline.add("aw_failed", aw=a, layer=layer, step=e.iteration, requests=rids)
    self.handle(WorkersFailed("aw", (a,), layer))

  def ews_failed(self, ews: list[int], layer: int):
    """EWs `ews` were declared failed at `layer` (together): fenced, then the policy decides."""
    e, state = self.e, self.state
    ews = [m for m in ews if m not in state.failed_ews]
    if not ews:
      return
    for m in ews:
      self.fence(state.ews[m])
      state.failed_ews.add(m)
      e.timeline.add("ew_failed", ew=m, layer=layer, step=e.iteration)
    self.handle(WorkersFailed("ew", tuple(ews), layer))

  def handle(self, event: Event):
    """Asks the policy about `event` and applies its actions in order. Requests of a fenced AW
    that the actions neither requeued nor failed fail (never left waiting for nothing)."""
    outer, self._event = self._event, event
    try:
      for action in self.policy.on_event(self.state, event):
        self._apply(action)
    finally:
      self._event = outer
    if outer is None:
      for a in list(self._orphans):
        self._apply(FailRequests(a, f"the recovery policy {self.policy.name!r} neither requeued "
                                    f"nor failed the requests of failed AW {a}"))

  def _apply(self, action: Action):
    e, state = self.e, self.state
    if isinstance(action, Requeue):
      rids = self._orphans.pop(action.aw, [])
      for r in rids:
        e.requests[r].restore = action.resume == "restore"
      e.waiting = rids + [r for r in e.waiting if r not in rids]
    elif isinstance(action, FailRequests):
      for r in self._orphans.pop(action.aw, []):
        e.fail_request(e.requests[r], action.cause)
    elif isinstance(action, Reroute):
      e.install_table(action.table)
      holes = action.table.unreachable()
      if holes and isinstance(self._event, WorkersFailed):
        e.timeline.add("experts_unreachable", pairs=len(holes), replacements=len(
            [b for b in self.replacements.builds if b.kind == "ew"]))
      e.timeline.add("table", epoch=action.table.epoch, failed_ews=sorted(state.failed_ews),
                     unreachable=len(holes))
    elif isinstance(action, Replace):
      state.coming.add((action.kind, action.index))
      if action.defer:
        self._deferred.append((action.kind, action.index, e.iteration))
      else:
        self._start(action.kind, action.index)
    elif isinstance(action, AwaitReplacements):
      self.wait_for_replacements()
    elif isinstance(action, Join):
      self._join(action.kind, action.index)
    elif isinstance(action, StartStore):
      self.restart_store()
    elif isinstance(action, RestartAll):
      self._orphans.clear()  # the restart recomputes every in-flight request
      raise self.Restart(action)
    else:
      raise TypeError(f"recovery policy {self.policy.name!r} returned {action!r}, which is not "
                      "an action (see resilience/policy.py)")

  def restart(self, action: RestartAll = RestartAll()):
    """Carries out a `RestartAll` (outside the step it was decided in)."""
    record = restart_all(self, action.shrink)
    if record is not None:
      self.restarts.append(record)

  # -- replacements ----------------------------------------------------------------------------

  def _start(self, kind: str, index: int):
    if self.replacements.start(kind, index) is None:  # no spare devices
      self.state.coming.discard((kind, index))

  def placed(self, busy: bool):
    """Called after each step's admissions and restores (`busy`: the step has rows to run).
    Deferred replacements start once the step after their worker's failure has run: service
    is restored first, capacity after; with nothing to run, they start at once."""
    before = None if not busy else self.e.iteration - 2
    todo = [d for d in self._deferred if before is None or d[2] <= before]
    self._deferred = [d for d in self._deferred if d not in todo]
    for kind, index, _ in todo:
      self._start(kind, index)

  def wait_for_replacements(self, timeout_s: float | None = None):
    """Blocks until every replacement being built has finished (each at most its
    `build_timeout_s`, or `timeout_s` for all), then offers them to the policy."""
    self.placed(busy=False)
    self.replacements.wait(timeout_s)
    self.poll()

  def _join(self, kind: str, index: int):
    e, state = self.e, self.state
    b = self._ready.pop((kind, index))
    if kind == "ew":
      state.ews[index] = b.worker
      state.failed_ews.discard(index)
    else:
      state.aws[index] = b.worker
      state.slot_owner[index] = [-1] * e.engine_cfg.slots_per_aw
      b.worker.set_table(state.table.active)
    e.link_data_plane()
    e.timeline.add("replacement_joined", worker=f"{kind}{index}", source=b.source,
                   build_s=b.done - b.started, waited_s=time.perf_counter() - b.done,
                   epoch=state.table.epoch, devices=[getattr(d, "id", d) for d in b.cell.devices])

  def _offer_finished(self):
    """Hands finished replacements to the policy (at a layer boundary); one it does not join
    is stopped and its devices go back to the spares."""
    for b in self.replacements.finished():
      self.state.coming.discard((b.kind, b.index))
      if b.error is not None:
        self.e.timeline.add("replacement_failed", worker=f"{b.kind}{b.index}", error=b.error)
        self.handle(ReplacementFailed(b.kind, b.index, b.error))
        continue
      self._ready[(b.kind, b.index)] = b
      self.handle(ReplacementReady(b.kind, b.index))
      if self._ready.pop((b.kind, b.index), None) is not None:
        b.worker.kill()
        self.state.spares.extend(b.cell.devices)
        self.e.timeline.add("replacement_discarded", worker=f"{b.kind}{b.index}")

  # -- faults and fencing ----------------------------------------------------------------------

  def worker(self, name: str) -> FaultDomain | None:
    state = self.state
    if name == "store":
      return state.store
    workers = state.aws if name.startswith("aw") else state.ews
    index = int(name[2:])
    if index >= len(workers):
      raise ValueError(f"fault on {name}: the engine has {len(workers)} "
                       f"{name[:2].upper()}s (0..{len(workers) - 1})")
    return workers[index]

  def inject(self, fault: Fault):
    e = self.e
    e.timeline.add("fault", worker=fault.worker, kind=fault.kind, step=e.iteration)
    if fault.kind == "restart":
      self.restart_store()
      return
    if fault.worker.startswith("node"):
      self._lose_node(int(fault.worker[4:]))
      return
    w = self.worker(fault.worker)
    if w is None or w.health is Health.DEAD:
      e.timeline.add("fault_ignored", worker=fault.worker, why="not running")
      return
    if fault.kind == "hang":
      w.hang()
      return
    cell = getattr(w, "cell", None)
    if cell is not None and fault.lost_device >= 0:
      if fault.lost_device >= cell.size:
        raise ValueError(f"fault on {fault.worker}: lost_device={fault.lost_device} but its cell "
                         f"has {cell.size} devices")
      self._pending_loss[w.name] = fault.lost_device
    w.kill()

  def _lose_node(self, index: int):
    """A whole node fails: every worker on it is killed at once (each then found and recovered
    as any other death), and its spare devices are lost with it."""
    state, slots = self.state, set(self.e.runtime.nodes()[index])
    for w in [*state.aws, *state.ews]:
      cell = getattr(w, "cell", None)
      if cell is not None and w.health is not Health.DEAD and slots & set(cell.devices):
        self._pending_loss[w.name] = next(i for i, d in enumerate(cell.devices) if d in slots)
        w.kill()
    state.lost_devices += [d for d in state.spares if d in slots]
    state.spares[:] = [d for d in state.spares if d not in slots]

  def fence(self, worker: FaultDomain):
    """Makes a failure final: arrays deleted, devices (but a lost one) back to the spare pool."""
    worker.kill()
    cell = getattr(worker, "cell", None)
    if cell is None:
      return
    lost = self._pending_loss.pop(worker.name, None)
    for i, d in enumerate(cell.devices):
      (self.state.lost_devices if i == lost else self.state.spares).append(d)

  def probe_idle(self):
    """Probes every member once per probe interval, so that a worker that dies while it has
    no data to send is found too; the detector declares one whose probes stay unanswered for
    its suspicion timeout (`Detector.watch`)."""
    e, state, now = self.e, self.state, time.perf_counter()
    if now - self._last_probe < e.engine_cfg.resilience.detection.probe_interval_s:
      return
    self._last_probe = now
    for a in state.live_aws():
      if e.detector.watch(state.aws[a], now):
        self.aw_failed(a, 0)
    for m in state.live_ews():
      if e.detector.watch(state.ews[m], now):
        self.ews_failed([m], 0)

  # -- restore ---------------------------------------------------------------------------------

  def restore(self, s: RequestState):
    """Restores a request placed on (s.aw, s.slot) from the store, or leaves it to re-prefill."""
    e, t0 = self.e, time.perf_counter()
    point, committed = None, 0
    store = self.state.store
    if store is not None:
      try:
        mark = store.mark()
        # The store must have applied every step sent so far; once it has, restores of the
        # same admission round (nothing is sent in between) need not wait again.
        if (store, mark) != self._store_synced and e.detector.silent(
            store, lambda: store.caught_up(mark)):
          self.store_failed()
        else:
          self._store_synced = (store, mark)
          point = store.restore_point(s.id)
      except WorkerDead:
        e.detector.closed(store, t0)
        self.store_failed()
    nbytes = 0
    if point is not None:
      committed = point[0].shape[1]
      nbytes = e._call(self.state.aws[s.aw], lambda w: w.restore(s.slot, *point))
      if nbytes is None:  # the target AW failed: the request is queued again
        self.aw_failed(s.aw, 0)
        return
    s.cached, s.restore = committed, False
    had, fed = s.failed_at
    record = dict(
        request=s.id, aw=s.aw, mode="restore" if point is not None else "reprefill",
        had=had, restored=committed, recomputed_tokens=had - committed,
        uncommitted_tail=had - committed if point is not None else had,
        token_layers=(had - committed) * e.cfg.num_layers + s.lost_layer * fed,
        bytes=nbytes, seconds=time.perf_counter() - t0)
    self.restores.append(record)
    e.timeline.add("restore", **record)

  # -- the snapshot store ----------------------------------------------------------------------

  def new_store(self) -> SnapshotStore:
    """A new store (a thread here, or a process in the process runtime), its own directory."""
    e, rc = self.e, self.e.engine_cfg.resilience
    self._store_gen += 1
    return e.runtime.new_store(e.cfg, os.path.join(e.store_dir, f"gen{self._store_gen}"),
                               rc.store_options, rc.detection, resilience=rc)

  def watch_store(self):
    """Declares a store failed that died (its thread or process ended), or that stopped
    draining its queue and does not answer probes."""
    store, probe = self.state.store, self.e.engine_cfg.resilience.detection.probe_interval_s
    if store is None:
      return
    if store.health is Health.DEAD or store.disconnected():
      cause = getattr(store, "error", None)
      self.e.detector.declare(store, time.perf_counter(),
                              "died" + (f": {cause!r}" if cause is not None else ""))
      self.store_failed()
      return
    if store.lag_s() < probe:  # it keeps up: that is its heartbeat
      self.e.detector.heard(store)
    elif self.e.detector.watch(store):  # behind, and its probes unanswered
      self.store_failed()

  def store_failed(self):
    e, state = self.e, self.state
    if state.store is None:
      return
    state.store.stop()
    state.store = None
    e.timeline.add("store_failed", step=e.iteration)
    self.handle(StoreFailed())

  def restart_store(self):
    """A new store; every live request's KV so far is sent to it at the next step boundary.

    If no store can be started, serving goes on without one (AW failures fall back to
    re-prefill) and a start is tried again after `STORE_RETRY_S`.
    """
    e, state = self.e, self.state
    if not e.engine_cfg.resilience.snapshots or (state.store is not None
                                                 and state.store.health is Health.ALIVE):
      return
    if state.store is not None:
      state.store.stop()
      state.store = None
    try:
      state.store = self.new_store()
    except Exception as err:  # noqa: BLE001 - e.g. no store process could start: serve on
      self._store_retry_at = time.perf_counter() + STORE_RETRY_S
      e.timeline.add("store_unavailable", step=e.iteration, error=repr(err))
      return
    self._store_retry_at = None
    self._base_pending = True
    e.timeline.add("store_started", step=e.iteration)

  def step_boundary(self):
    """Called between iterations: base snapshots for a new store, then `poll`."""
    e, state = self.e, self.state
    if self._store_retry_at is not None and time.perf_counter() >= self._store_retry_at:
      self.restart_store()
    if self._base_pending and state.store is not None:
      self._base_pending = False
      for a in state.live_aws():
        rows = [(r, e.requests[r].slot, e.requests[r].cached) for r in state.requests_on(a)
                if e.requests[r].cached > 0]
        copy = e._call(state.aws[a], lambda w: w.cache_copy()) if rows else None
        if copy is not None:
          e._to_store("base", a, rows, copy[0], copy[1])
      e.timeline.add("store_base_sent", step=e.iteration)
    self.poll()

  def poll(self):
    """At a layer boundary: finished replacements to the policy, and the store's watchdog."""
    self.watch_store()
    self._offer_finished()

  def close(self):
    """Stops background work: builds are waited for up to `close_timeout_s` together (one
    still running then is abandoned, and its worker stopped when it finishes), then the store."""
    self._deferred = []
    self.replacements.close(self.e.engine_cfg.resilience.close_timeout_s)
    if self.state.store is not None:
      self.state.store.stop()

  def summary(self) -> dict:
    tl, restores = self.e.timeline, self.restores
    return dict(
        failures=len(tl.of("declared_failed")),
        detection_s=[round(ev["detection_s"], 6) for ev in tl.of("declared_failed")],
        restores=len([r for r in restores if r["mode"] == "restore"]),
        reprefills=len([r for r in restores if r["mode"] == "reprefill"]),
        restore_bytes=sum(r["bytes"] for r in restores),
        restore_s_max=max((r["seconds"] for r in restores), default=0.0),
        recomputed_tokens=sum(r["recomputed_tokens"] for r in restores)
        + sum(r["recomputed_tokens"] for r in self.restarts),
        recomputed_token_layers=sum(r["token_layers"] for r in restores),
        uncommitted_tail_tokens=sum(r["uncommitted_tail"] for r in restores),
        table_epoch=self.state.table.epoch,
        snapshot_bytes_in=0 if self.state.store is None else self.state.store.bytes_in,
        restarts=[{k: v for k, v in r.items() if k != "requests"} for r in self.restarts],
    )
