"""The orchestrator's shared part: fault injection, fencing, the snapshot store's lifecycle.

`Recovery` holds what every recovery policy shares: injecting faults, fencing a failed worker
(its arrays deleted, its surviving devices back to the spare pool), probing idle members, the
snapshot store's watchdog and restart. The policies subclass it: `Tarragon`
(`resilience/tarragon.py`) repairs only what failed; `GlobalRestart`
(`resilience/global_restart.py`) is the baseline.

- Store failure: serving goes on; AW failures fall back to re-prefill until a new store has
  received a base snapshot of every live request. A store that cannot be started is tried
  again later; serving never waits for it.
"""

from __future__ import annotations

import os
import time

from tarragon_jax.resilience.faults import Fault
from tarragon_jax.resilience.snapshot_store import SnapshotStore
from tarragon_jax.worker.fault_domain import FaultDomain, Health

STORE_RETRY_S = 1.0  # a store that could not be started is tried again this much later


class Recovery:
  """Fault injection, fencing and the snapshot store's lifecycle; subclasses repair."""

  class Restart(Exception):
    """Raised inside a step when the policy restarts everything (the baseline)."""

  def __init__(self, engine):
    self.e = engine
    self._pending_loss: dict[str, int] = {}
    self._store_gen = 0
    self._base_pending = False
    self._store_retry_at: float | None = None  # when to try starting a store again
    self._last_probe = 0.0
    self.restores: list[dict] = []

  @property
  def recovering(self) -> bool:
    return False

  @property
  def aw_coming(self) -> bool:
    """Whether a replacement AW is being built (requests may wait for it)."""
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
                               rc.store_options, rc.detection, resilience=rc)

  def watch_store(self):
    """Declares a store failed that died (its thread or process ended), or that stopped
    draining its queue and does not answer probes."""
    store, probe = self.e.store, self.e.engine_cfg.resilience.detection.probe_interval_s
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
    e = self.e
    if e.store is None:
      return
    e.store.stop()
    e.store = None
    e.timeline.add("store_failed", step=e.iteration)
    if e.engine_cfg.resilience.replace_store:
      self.restart_store()

  def restart_store(self):
    """A new store; every live request's KV so far is sent to it at the next step boundary.

    If no store can be started, serving goes on without one (AW failures fall back to
    re-prefill) and a start is tried again after `STORE_RETRY_S`.
    """
    e = self.e
    if not e.engine_cfg.resilience.snapshots or (e.store is not None
                                                 and e.store.health is Health.ALIVE):
      return
    if e.store is not None:
      e.store.stop()
      e.store = None
    try:
      e.store = self.new_store()
    except Exception as err:  # noqa: BLE001 - e.g. no store process could start: serve on
      self._store_retry_at = time.perf_counter() + STORE_RETRY_S
      e.timeline.add("store_unavailable", step=e.iteration, error=repr(err))
      return
    self._store_retry_at = None
    self._base_pending = True
    e.timeline.add("store_started", step=e.iteration)

  def step_boundary(self):
    """Called between iterations: base snapshots for a new store, then `poll`."""
    e = self.e
    if self._store_retry_at is not None and time.perf_counter() >= self._store_retry_at:
      self.restart_store()
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
    no data to send is found too; the detector declares one whose probes stay unanswered for
    its suspicion timeout (`Detector.watch`)."""
    e, now = self.e, time.perf_counter()
    interval = e.engine_cfg.resilience.detection.probe_interval_s
    if now - self._last_probe < interval:
      return
    self._last_probe = now
    for kind, workers in (("aw", e.aws), ("ew", e.ews)):
      for i, w in enumerate(workers):
        if (e.slot_owner[i] is None) if kind == "aw" else (i in e.failed_ews):
          continue
        if e.detector.watch(w, now):
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
