"""`Tarragon`: per-worker recovery, repairing only what failed.

- EW failure: the AWs that had sent it tokens replay the layer to shadows (see
  `Engine.run_layer`); the table's epoch is bumped for every AW; a replacement EW is built on
  spare devices in a background thread (weights copied from peers, orbax as the fallback,
  executables compiled) and joins at a layer boundary. An expert left with no live replica
  waits for a replacement that is being built (up to its `build_timeout_s`); without one it
  stays unreachable, and a token routed to it fails its request.
- AW failure: its requests go back to the front of the queue; when placed on a surviving AW
  each is restored from its last committed token in the snapshot store (only the uncommitted
  tail is recomputed), or re-prefilled if it was in prefill or the store has nothing. With no
  AW alive and none being built, waiting requests fail (`Engine.step`).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import numpy as np

from tarragon_jax.checkpoint import load_checkpoint
from tarragon_jax.layers.params import ExpertParams
from tarragon_jax.mesh.cells import Cell
from tarragon_jax.resilience.orchestrator import Recovery
from tarragon_jax.resilience.routing_table import RoutingTable
from tarragon_jax.worker.fault_domain import FaultDomain, WorkerDead
from tarragon_jax.worker.requests import Phase, RequestState


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
  abandoned: bool = False  # past its bound or the engine closed: its worker is not wanted


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

  @property
  def aw_coming(self) -> bool:
    return any(b.kind == "aw" for b in self._builds) or any(
        kind == "aw" for kind, _, _ in self._to_build)

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
      self._start_builds()
      coming = [b for b in self._builds if b.kind == "ew"]
      e.timeline.add("experts_unreachable", pairs=len(table.unreachable()),
                     replacements=len(coming))
      if coming:
        self.wait_for_replacements()
        table = self._table()
    # Experts still without a live replica stay unreachable (-1): a token routed to one fails
    # its request (`datapath.aw_combine`), never computes with a dead EW's slot.
    e.install_table(table)
    e.timeline.add("table", epoch=table.epoch, failed_ews=sorted(e.failed_ews),
                   unreachable=len(table.unreachable()))

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
      if not s.restore:  # (a request whose restore failed keeps what it had lost first)
        s.lost_layer, s.failed_at = layer, (s.cached, len(s.feed))
      s.restore, s.phase = True, Phase.WAITING
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

  def wait_for_replacements(self, timeout_s: float | None = None):
    """Blocks until every replacement being built has finished (each at most its
    `build_timeout_s`, or `timeout_s` for all), then joins them."""
    self._start_builds()
    for b in list(self._builds):
      bound = b.started + self.e.engine_cfg.resilience.build_timeout_s
      if timeout_s is not None:
        bound = min(bound, time.perf_counter() + timeout_s)
      b.thread.join(max(0.0, bound - time.perf_counter()))
    self.poll()

  def close(self):
    """Stops background work: builds are waited for up to `close_timeout_s` together (one
    still running then is abandoned, and its worker stopped when it finishes)."""
    self._to_build = []
    deadline = time.perf_counter() + self.e.engine_cfg.resilience.close_timeout_s
    for b in list(self._builds):
      b.abandoned = True
      b.thread.join(max(0.0, deadline - time.perf_counter()))
      if b.worker is not None:
        b.worker.kill()
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
          _, params = load_checkpoint(e.weights_dir, shardings=sharding,
                                      expect=e.weights_fingerprint)
          b.source = "orbax"
      w = e.make_worker(b.kind, b.index, b.cell, params)
      b.worker = w
      if (b.kind, b.cell.devices) not in e.hot_cells:  # a hot spare has compiled already
        e.warm_worker(w)
    except Exception as err:  # noqa: BLE001 - reported in the timeline, serving goes on
      b.error = repr(err)
    if b.abandoned and b.worker is not None:
      b.worker.kill()
    b.done = time.perf_counter()

  def poll(self):
    """Joins finished replacements (at a layer boundary) and watches the store."""
    super().poll()
    e = self.e
    bound = e.engine_cfg.resilience.build_timeout_s
    now = time.perf_counter()
    for b in [b for b in self._builds if b.done is None and now - b.started > bound]:
      # Its devices stay out of the pool: the thread may still be using them.
      self._builds.remove(b)
      b.abandoned = True
      e.timeline.add("replacement_failed", worker=f"{b.kind}{b.index}",
                     error=f"not built within build_timeout_s={bound}")
    for b in [b for b in self._builds if b.done is not None]:
      self._builds.remove(b)
      name = f"{b.kind}{b.index}"
      if b.error is not None:
        if b.worker is not None:
          b.worker.kill()
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


