"""The orchestrator: membership, failure handling, routing-table epochs, restores, replacements.

`Recovery` holds what both recovery policies share: fault injection, fencing a failed worker
(its arrays deleted, its surviving devices back to the spare pool), the snapshot store's
watchdog and restart. `Tarragon` repairs only what failed:

- EW failure: the AWs that had sent it tokens replay the layer to shadows (see
  `Engine.run_layer`); the table's epoch is bumped for every AW; a replacement EW is built on
  spare devices in a background thread (weights restored with orbax, executables compiled)
  and joins at a layer boundary.
- AW failure: its requests go back to the front of the queue; when placed on a surviving AW
  each is restored from its last committed token in the snapshot store (only the uncommitted
  tail is recomputed), or re-prefilled if it was in prefill or the store has nothing.
- Store failure: serving goes on; AW failures fall back to re-prefill until a new store has
  received a base snapshot of every live request.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import jax
import numpy as np

from tarragon_jax.checkpoint import load_checkpoint
from tarragon_jax.layers.params import ExpertParams
from tarragon_jax.mesh.cells import Cell
from tarragon_jax.resilience.fault_domain import FaultDomain, Health, WorkerDead
from tarragon_jax.resilience.faults import Fault
from tarragon_jax.resilience.routing_table import RoutingTable
from tarragon_jax.resilience.snapshot_store import SnapshotStore
from tarragon_jax.serving.requests import Phase, RequestState


class Recovery:
  """Fault injection, fencing and the snapshot store's lifecycle; subclasses repair."""

  class Restart(Exception):
    """Raised inside a step when the policy restarts everything (the baseline)."""

  def __init__(self, engine):
    self.e = engine
    self._pending_loss: dict[str, int] = {}
    self._store_probe: float | None = None
    self._store_gen = 0
    self._base_pending = False
    self._last_probe = 0.0
    self._unanswered: dict[str, float] = {}  # worker -> when its first probe went unanswered
    self.restores: list[dict] = []

  @property
  def recovering(self) -> bool:
    return False

  # -- faults and fencing ----------------------------------------------------------------------

  def worker(self, name: str) -> FaultDomain | None:
    e = self.e
    if name == "store":
      return e.store
    workers = e.aws if name.startswith("aw") else e.ews
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

  def fence(self, worker: FaultDomain):
    """Makes a failure final: arrays deleted, devices (but a lost one) back to the spare pool."""
    worker.kill()
    cell = getattr(worker, "cell", None)
    if cell is None:
      return
    lost = self._pending_loss.pop(worker.name, None)
    for i, d in enumerate(cell.devices):
      (self.e.lost_devices if i == lost else self.e.spares).append(d)

  # -- the snapshot store ----------------------------------------------------------------------

  def new_store(self) -> SnapshotStore:
    """A new store (a thread here, or a process in the process runtime), its own directory."""
    e, rc = self.e, self.e.engine_cfg.resilience
    self._store_gen += 1
    return e.runtime.new_store(e.cfg, os.path.join(e.store_dir, f"gen{self._store_gen}"),
                               rc.store_options, rc.detection)

  def watch_store(self):
    """Declares a store failed that stopped draining its queue and does not answer probes."""
    store, probe = self.e.store, self.e.engine_cfg.resilience.detection.probe_interval_s
    if store is None or store.health is Health.DEAD:
      return
    lag = store.lag_s()
    if lag < probe or store.probe():
      self._store_probe = None
      return
    now = time.perf_counter()
    if self._store_probe is None:
      self._store_probe = now
    elif now - self._store_probe >= probe:
      self.e.detector.declare(store, now - lag, "probe unanswered")
      self.store_failed()

  def store_failed(self):
    e = self.e
    if e.store is None:
      return
    e.store.stop()
    e.store = None
    e.timeline.add("store_failed", step=e.iteration)
    if e.engine_cfg.resilience.replace_store:
      self.restart_store()

  def restart_store(self):
    """A new store; every live request's KV so far is sent to it at the next step boundary."""
    e = self.e
    if not e.engine_cfg.resilience.snapshots or (e.store is not None
                                                 and e.store.health is Health.ALIVE):
      return
    if e.store is not None:
      e.store.stop()
    e.store = self.new_store()
    self._base_pending = True
    e.timeline.add("store_started", step=e.iteration)

  def step_boundary(self):
    """Called between iterations: base snapshots for a new store, then `poll`."""
    e = self.e
    if self._base_pending and e.store is not None:
      self._base_pending = False
      for a, owners in enumerate(e.slot_owner):
        rows = [(r, e.requests[r].slot, e.requests[r].cached) for r in (owners or [])
                if r >= 0 and e.requests[r].cached > 0]
        copy = e._call(e.aws[a], lambda w: w.cache_copy()) if rows else None
        if copy is not None:
          e._to_store("base", a, rows, copy[0], copy[1])
      e.timeline.add("store_base_sent", step=e.iteration)
    self.poll()

  def poll(self):
    self.watch_store()

  def placed(self, busy: bool):
    """Called after each step's admissions and restores (`busy`: the step has rows to run):
    background repair may start."""

  def probe_idle(self):
    """Probes every member once per probe interval, so that a worker that dies while it has
    no data to send is found too; one unanswered for an interval is declared failed."""
    e, now = self.e, time.perf_counter()
    interval = e.engine_cfg.resilience.detection.probe_interval_s
    if now - self._last_probe < interval:
      return
    self._last_probe = now
    for kind, workers in (("aw", e.aws), ("ew", e.ews)):
      for i, w in enumerate(workers):
        if (e.slot_owner[i] is None) if kind == "aw" else (i in e.failed_ews):
          continue
        if w.probe():
          self._unanswered.pop(w.name, None)
          continue
        first = self._unanswered.setdefault(w.name, now)
        if now - first >= interval:
          del self._unanswered[w.name]
          e.detector.declare(w, first, "idle probe unanswered")
          if kind == "aw":
            self.aw_failed(i, 0)
          else:
            self.ews_failed([i], 0)

  def wait_for_replacements(self, timeout_s: float = 600.0):
    """Blocks until replacements being built have joined (none in this policy)."""
    self.poll()

  def close(self):
    """Stops background work (the store's thread)."""
    if self.e.store is not None:
      self.e.store.stop()

  def summary(self) -> dict:
    tl = self.e.timeline
    restores = self.restores
    return dict(
        failures=len(tl.of("declared_failed")),
        detection_s=[round(ev["detection_s"], 6) for ev in tl.of("declared_failed")],
        restores=len([r for r in restores if r["mode"] == "restore"]),
        reprefills=len([r for r in restores if r["mode"] == "reprefill"]),
        restore_bytes=sum(r["bytes"] for r in restores),
        restore_s_max=max((r["seconds"] for r in restores), default=0.0),
        recomputed_tokens=sum(r["recomputed_tokens"] for r in restores),
        recomputed_token_layers=sum(r["token_layers"] for r in restores),
        uncommitted_tail_tokens=sum(r["uncommitted_tail"] for r in restores),
        table_epoch=self.e.table.epoch,
        snapshot_bytes_in=0 if self.e.store is None else self.e.store.bytes_in,
    )


@dataclasses.dataclass
class _Build:
  kind: str  # "aw" | "ew"
  index: int
  cell: Cell
  started: float
  worker: FaultDomain | None = None
  error: str | None = None
  done: float | None = None
  source: str = ""  # where the weights came from: "peer" or "orbax"
  thread: threading.Thread | None = None


class Tarragon(Recovery):
  """Per-worker recovery: shadows and replay for EWs, per-request restore for AWs."""

  def __init__(self, engine):
    super().__init__(engine)
    self._builds: list[_Build] = []
    self._to_build: list[tuple[str, int, int]] = []  # (kind, index, iteration it failed in)
    self._generation = 0
    self._store_synced: tuple | None = None  # (store, mark) it was last seen caught up to

  @property
  def recovering(self) -> bool:
    e = self.e
    return bool(self._builds or self._to_build) or any(e.requests[r].restore for r in e.waiting)

  def _table(self) -> RoutingTable:
    e = self.e
    table = e.base_table
    for m in sorted(e.failed_ews):
      table = table.without_ew(m)
    return dataclasses.replace(table, epoch=e.table.epoch + 1)

  def ews_failed(self, ews: list[int], layer: int):
    e = self.e
    ews = [m for m in ews if m not in e.failed_ews]
    if not ews:
      return
    for m in ews:
      self.fence(e.ews[m])
      e.failed_ews.add(m)
      e.timeline.add("ew_failed", ew=m, layer=layer, step=e.iteration)
      self._to_build.append(("ew", m, e.iteration))
    table = self._table()
    if table.unreachable():  # no replica left: wait for the replacements (a stall, recorded)
      e.timeline.add("experts_unreachable", pairs=len(table.unreachable()))
      self._start_builds()
      self.wait_for_replacements()
      table = self._table()
      if table.unreachable():
        raise RuntimeError(f"EWs {sorted(e.failed_ews)} failed, experts {table.unreachable()[:4]} "
                           f"have no replica left and no spare device could rebuild them; add "
                           f"shadows_per_expert or spare devices")
    e.set_routing_table(table)
    e.timeline.add("table", epoch=table.epoch, failed_ews=sorted(e.failed_ews))

  def aw_failed(self, a: int, layer: int):
    e = self.e
    if e.slot_owner[a] is None:
      return
    self.fence(e.aws[a])
    rids = [r for r in (e.slot_owner[a] or []) if r >= 0]
    e.slot_owner[a] = None
    e.active_tables[a] = None
    for r in rids:
      s = e.requests[r]
      s.restore, s.lost_layer, s.phase = True, layer, Phase.WAITING
      s.failed_at = (s.cached, len(s.feed))
    e.waiting = rids + [r for r in e.waiting if r not in rids]
    e.timeline.add("aw_failed", aw=a, layer=layer, step=e.iteration, requests=rids)
    self._to_build.append(("aw", a, e.iteration))

  def restore(self, s: RequestState):
    """Restores a request placed on (s.aw, s.slot) from the store, or leaves it to re-prefill."""
    e, t0 = self.e, time.perf_counter()
    point, committed = None, 0
    store = e.store
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
      nbytes = e._call(e.aws[s.aw], lambda w: w.restore(s.slot, *point))
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

  # -- replacements ----------------------------------------------------------------------------

  def wait_for_replacements(self, timeout_s: float = 600.0):
    """Blocks until every replacement being built has finished, then joins them."""
    self._start_builds()
    deadline = time.perf_counter() + timeout_s
    for b in list(self._builds):
      b.thread.join(max(0.0, deadline - time.perf_counter()))
    self.poll()

  def close(self):
    self._to_build = []
    for b in list(self._builds):
      b.thread.join()
    super().close()

  def placed(self, busy: bool):
    """Starts a replacement once the step after its worker's failure has run: that step
    serves the failed AW's requests restored on survivors (or the failed EW's experts from
    shadows), and a build's weight copy and set-up would compete with it for the host. Service
    is restored first, capacity after; with nothing to run, builds start at once."""
    self._start_builds(None if not busy else self.e.iteration - 2)

  def _start_builds(self, failed_by: int | None = None):
    """Starts the replacements for workers that failed in iteration `failed_by` or earlier
    (None: all)."""
    todo = [b for b in self._to_build if failed_by is None or b[2] <= failed_by]
    self._to_build = [b for b in self._to_build if b not in todo]
    if self.e.engine_cfg.resilience.replace_failed:
      for kind, index, _ in todo:
        self._provision(kind, index)

  def _provision(self, kind: str, index: int):
    e = self.e
    size = e.plan.devices_per_ew if kind == "ew" else e.plan.devices_per_aw
    if not e.spares:
      e.timeline.add("no_spare", worker=f"{kind}{index}")
      return
    devices = tuple(e.spares[:size])
    del e.spares[:len(devices)]
    self._generation += 1
    build = _Build(kind, index, Cell(f"{kind}{index}.r{self._generation}", devices),
                   time.perf_counter())
    self._builds.append(build)
    e.timeline.add("replacement_started", worker=f"{kind}{index}",
                   devices=[getattr(d, "id", d) for d in devices])
    build.thread = threading.Thread(target=self._build, args=(build,), daemon=True)
    build.thread.start()

  def _peer_weights(self, kind: str, index: int):
    """The replacement's weights copied from live peers, or None if no peer holds them all.

    An AW's weights are every AW's; an EW's slots are gathered, slot by slot, from an EW that
    holds a replica of the same expert (a shadow or a primary).
    """
    e = self.e
    alive = [i for i, owners in enumerate(e.slot_owner) if owners is not None and i != index]
    if kind == "aw":
      return e.aws[alive[0]].params if alive else None
    p, S = e.placement, e.placement.slots_per_layer
    peers: dict[int, ExpertParams] = {}
    parts = {name: np.zeros((p.num_layers, S) + getattr(e.ews[0].weights, name).shape[2:],
                            e.cfg.dtype) for name in ("w_gate", "w_up", "w_down")}
    for l in range(p.num_layers):
      for s in range(S):
        expert = p.contents[l, index, s]
        if expert < 0:
          continue
        sources = [int(q) for q in e.base_table.replicas[l, expert] if q >= 0
                   and q // S != index and q // S not in e.failed_ews]
        if not sources:
          return None
        m, local = divmod(sources[0], S)
        if m not in peers:
          peers[m] = jax.tree.map(np.asarray, e.ews[m].weights)  # device -> host, once
        for name in parts:
          parts[name][l, s] = getattr(peers[m], name)[l, local]
    return ExpertParams(**parts)

  def _build(self, b: _Build):
    """Runs off the serving thread: weights from peers (else orbax), worker on its cell."""
    e = self.e
    try:
      params, b.source = None, "orbax"
      if not e.runtime.remote:  # (a new process loads its weights itself, with orbax)
        try:
          params, b.source = self._peer_weights(b.kind, b.index), "peer"
        except Exception:  # noqa: BLE001 - a peer failed while being copied: use orbax
          params = None
        if params is None:
          sharding = jax.sharding.SingleDeviceSharding(b.cell.devices[0])
          _, params = load_checkpoint(e.weights_dir, shardings=sharding)
          b.source = "orbax"
      w = e.make_worker(b.kind, b.index, b.cell, params)
      if (b.kind, b.cell.devices) not in e.hot_cells:  # a hot spare has compiled already
        e.warm_worker(w)
      b.worker = w
    except Exception as err:  # noqa: BLE001 - reported in the timeline, serving goes on
      b.error = repr(err)
    b.done = time.perf_counter()

  def poll(self):
    """Joins finished replacements (at a layer boundary) and watches the store."""
    super().poll()
    e = self.e
    for b in [b for b in self._builds if b.done is not None]:
      self._builds.remove(b)
      name = f"{b.kind}{b.index}"
      if b.error is not None:
        e.spares.extend(b.cell.devices)
        e.timeline.add("replacement_failed", worker=name, error=b.error)
        continue
      if b.kind == "ew":
        e.ews[b.index] = b.worker
        e.failed_ews.discard(b.index)
        e.set_routing_table(self._table())
      else:
        e.aws[b.index] = b.worker
        e.slot_owner[b.index] = [-1] * e.engine_cfg.slots_per_aw
        e.active_tables[b.index] = b.worker.put(e.table.active)
      e.timeline.add("replacement_joined", worker=name, source=b.source,
                     build_s=b.done - b.started,
                     waited_s=time.perf_counter() - b.done, epoch=e.table.epoch,
                     devices=[getattr(d, "id", d) for d in b.cell.devices])


