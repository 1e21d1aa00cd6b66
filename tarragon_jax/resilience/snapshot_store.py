"""The snapshot store: asynchronous, incremental KV-cache snapshots with per-request restore.

After every step each attention worker hands the store that step's new KV, every layer of it,
as one array (`log_step`; the engine sends a host copy made when the step's tokens are fetched,
a device array is copied by the store); the call only enqueues, nothing waits on the decode
path. The store's own thread applies the queued steps in batches, into a host mirror of that
AW's cache rows (one vectorised write for all decode rows of a step), and appends the step's
commit record to a per-AW log: a step's tokens are committed once all of their layers are in
host memory, and only a row that continues its request's committed prefix is taken. A request
restored onto another AW brings its prefix to its new row; a dead AW's row is copied out before
a replacement reuses it. Committed KV is persisted in the background with tensorstore
(`KVArchive`). An orchestrator reads a request's last committed position and its KV back with
`restore_point`.

Legend: L layers, B rows (slots) of the sending AW, T tokens per row, S max_seq_len, K kv
heads, H head dim; a leading 2 stacks k and v.

The store's thread holds the GIL while it works, and on a small host every microsecond of it is
taken from the serving loop, so its per-step path is short: a decode step of an unchanged batch
comes without rows (a continuation of the AW's previous step), and a batch's run of them costs
one numpy write per AW.

The store fails stop: if its thread dies (a durable-tier write or commit that fails, or any
other error) the store is dead, as if killed. Its durable tier no longer follows its host tier,
so the engine replaces it (a new store, a new directory, base snapshots) rather than keep a store
whose restore points silently stop being durable.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import queue
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np
from absl import logging

from tarragon_jax.config import ModelConfig
from tarragon_jax.resilience.kv_archive import CHUNK, KVArchive
from tarragon_jax.worker.fault_domain import FaultDomain, Health, WorkerDead


@dataclasses.dataclass
class _RequestKV:
  """Where a request's committed KV lives: row `slot` of AW `aw`'s mirror, or its own arrays
  (`k`, `v` [L, n, K, H]) once that row was handed to another request before it moved on."""
  aw: int | None = None
  slot: int | None = None
  k: np.ndarray | None = None
  v: np.ndarray | None = None
  committed: int = 0  # positions [0, committed) are complete in every layer
  archived: int = 0  # positions handed to the durable tier


@dataclasses.dataclass
class _Mirror:
  """Host copy of one AW's cache rows: kv [2, L, B, S, K, H]; owner[slot] = request.

  `cells` views kv as [2L, B * S, K * H], so that a step's decode rows (row b's position p is
  cell b * S + p) are written with one fancy index.
  """
  kv: np.ndarray
  owner: list
  cells: np.ndarray = dataclasses.field(init=False)

  def __post_init__(self):
    two, L, B, S, K, H = self.kv.shape
    self.cells = self.kv.reshape(two * L, B * S, K * H)


@dataclasses.dataclass
class _Run:
  """An AW's last applied step when each of its rows went in place into its mirror: what a
  continuation (`log_step` with rows None: the same rows, one position on) writes and commits."""
  seq: int
  rids: list
  kvs: list  # their _RequestKV, in row order
  slots: np.ndarray  # i64[R] their mirror rows
  cells: np.ndarray  # i64[R] where each row's next position goes in `_Mirror.cells`


_LIVE: weakref.WeakSet = weakref.WeakSet()  # stores whose thread runs


def _to_host(item):
  """A queued item with its KV as numpy arrays; unchanged if they cannot be had (the KV of a
  killed AW is lost: applying the item fails again, and it commits nothing)."""
  try:
    if item is not None and item[0] == "step":
      return (*item[:4], np.asarray(item[4]))
    if item is not None and item[0] == "base":
      return (*item[:3], np.asarray(item[3]), np.asarray(item[4]))
  except Exception:  # noqa: BLE001
    pass
  return item


@atexit.register
def _stop_live_stores():
  """Stops store threads a program left running before the interpreter shuts down: a daemon
  thread still inside jax's C++ (a host copy) when finalization stops it aborts the process."""
  for store in list(_LIVE):
    store.stop()


class SnapshotStore(FaultDomain):
  """Per-AW KV logs with commit records, host memory first, tensorstore in the background."""

  def __init__(self, cfg: ModelConfig, directory: str, flush_interval_s: float = 0.2,
               durable_chunk: int = CHUNK, max_queue: int = 100_000, name: str = "store",
               batch_interval_s: float = 0.2,
               on_death: Callable[[BaseException], None] | None = None):
    """`on_death(error)` is called from the store's thread if the thread dies of anything but
    `stop` or `kill` (a store process passes one that ends the process, so that its connection
    drops); the store is then dead, with `error` the exception."""
    self.cfg, self.name = cfg, name
    self.on_death = on_death
    self.error: BaseException | None = None  # what the store's thread died of
    self.stopped = False  # `stop` was called: the end of serving, not a failure
    self.flush_interval_s = flush_interval_s
    # The thread applies what queued up in this long (unless hurried: a restore or `settle`
    # calls `mark`), at most one flush interval (a flush follows a batch): each wake-up has a
    # fixed CPU cost, and a step applied in a long batch costs less than in a short one.
    self.batch_s = min(batch_interval_s, flush_interval_s)
    self._hurry = threading.Event()
    self.archive = KVArchive(directory, cfg, chunk=durable_chunk)
    self.max_queue = max_queue
    self._queue: queue.SimpleQueue = queue.SimpleQueue()  # C-level put/get: cheap for the AW
    self._kv: dict[int, _RequestKV] = {}
    self._mirrors: dict[int, _Mirror] = {}  # aw -> its cache rows in host memory
    # aw -> its latest commit records (step seq, {request: committed positions})
    self.log: dict[int, collections.deque] = {}
    self._runs: dict[int, _Run] = {}  # aw -> its last step, if a continuation can follow it
    self._lock = threading.Lock()  # the host tier (held while a batch is applied)
    self._count_lock = threading.Lock()  # the queue counters (never held for long: the AW's
    # enqueue must not wait behind the store's work)
    self.enqueued = self.processed = 0
    self.bytes_in = 0
    self._oldest_pending: float | None = None
    self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
    self._thread.start()
    _LIVE.add(self)

  # -- AW side: enqueue only ----------------------------------------------------------------

  def log_step(self, aw: int, seq: int, rows: list[tuple[int, int, int, int]] | None, kv):
    """Step `seq` of AW `aw`: kv [2, L, B, T, K, H] (host or device); rows are (request id,
    slot, start position, new tokens), or None for a continuation: the rows of the AW's step
    `seq - 1`, each one token on (a decode step of an unchanged batch, the common case; the
    store applies a run of them with one write). A continuation the store cannot place (its
    step `seq - 1` was lost or not wholly in place) commits nothing, as a gap."""
    self._put(("step", aw, seq, rows, kv))

  def base(self, aw: int, rows: list[tuple[int, int, int]], k, v):
    """A whole cache copy of AW `aw` (the cache's own k, v [L, B, S, K, H]) for rows (request
    id, slot, length)."""
    self._put(("base", aw, rows, k, v))

  def forget(self, rid: int):
    """The request finished: its host and durable copies are released."""
    self._put(("forget", rid))

  def _put(self, item):
    self._check_alive()
    if self._queue.qsize() >= self.max_queue:
      raise queue.Full(f"{self.name}: {self.max_queue} items queued (max_queue); the store is "
                       "not draining")
    with self._count_lock:
      self._queue.put(item)
      self.enqueued += 1
      if self._oldest_pending is None:
        self._oldest_pending = time.perf_counter()

  # -- orchestrator side --------------------------------------------------------------------

  def lag_s(self) -> float:
    """How long the oldest unprocessed item has waited (0 if the store is caught up)."""
    with self._count_lock:
      t = self._oldest_pending
    return 0.0 if t is None else time.perf_counter() - t

  def mark(self) -> int:
    """The count of items queued so far; wakes the store's thread to apply them now."""
    self._check_alive()
    self._hurry.set()
    return self.enqueued

  def caught_up(self, mark: int) -> bool:
    """Whether the items queued before `mark` are applied; WorkerDead once the store is dead
    (they never will be)."""
    self._check_alive()
    return self.processed >= mark

  @property
  def flushing(self) -> bool:
    self._check_alive()
    return self.archive.flushing

  def committed(self, rid: int) -> int:
    with self._lock:
      kv = self._kv.get(rid)
      return 0 if kv is None else kv.committed

  def restore_point(self, rid: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Host copies (k, v) [L, n, K, H] of the request's committed KV, or None if none."""
    if not self._serving():
      return None
    with self._lock:
      kv = self._kv.get(rid)
      if kv is None or kv.committed == 0:
        return None
      k, v = self._arrays(kv)
      return k[:, :kv.committed].copy(), v[:, :kv.committed].copy()

  def stop(self, timeout_s: float = 10.0) -> bool:
    """Shuts the store down cleanly (the end of serving, not a failure); False (and a logged
    warning) if its thread has not ended after `timeout_s` (stuck in a copy or in tensorstore:
    it exits when that returns, the store is dead meanwhile)."""
    self.stopped = True
    if self.health is not Health.DEAD:
      self.kill()
    self._thread.join(timeout_s)
    if self._thread.is_alive():
      logging.warning("%s: its thread has not ended %.1f s after stop", self.name, timeout_s)
      return False
    _LIVE.discard(self)
    return True

  def kill(self):
    super().kill()
    with self._lock:
      self._kv, self._mirrors, self.log, self._runs = {}, {}, {}, {}
    self._queue.put(None)  # wake the thread so that it exits

  def _serving(self) -> bool:
    self._check_alive()
    return self.health is Health.ALIVE

  def _check_alive(self):
    """Raises WorkerDead, saying why, if the store is dead."""
    if self.health is not Health.DEAD:
      return
    err = self.error
    if err is None:
      raise WorkerDead(f"{self.name} is dead")
    raise WorkerDead(f"{self.name} is dead: its thread died of {type(err).__name__}: "
                     f"{err}") from err

  # -- the store's thread -------------------------------------------------------------------

  def _loop(self):
    try:
      self._work()
    except BaseException as err:  # noqa: BLE001 - no death of this thread may go unseen
      if self.health is not Health.DEAD:  # not ended by `stop` or `kill`: a failure
        self._died(err)

  def _died(self, err: BaseException):
    """The store's thread is ending with `err`: the store is dead (fail-stop)."""
    self.error = err  # before the health: a caller that sees DEAD sees why
    logging.error("%s: its thread died; the store is dead", self.name, exc_info=err)
    self.kill()
    _LIVE.discard(self)
    if self.on_death is not None:
      self.on_death(err)

  def _work(self):
    last_flush = time.perf_counter()
    while self.health is not Health.DEAD:
      if self.health is Health.HUNG:
        time.sleep(self.flush_interval_s / 10)  # a hung store does nothing at all
        continue
      try:  # whatever is queued is applied as one batch: fewer hand-offs of the GIL
        batch = [self._queue.get(timeout=self.flush_interval_s / 4)]
      except queue.Empty:
        batch = []
      else:
        self._hurry.wait(self.batch_s)  # let a few steps queue up: fewer thread hand-offs
        self._hurry.clear()
        # This thread is the only consumer: qsize items are there to take.
        batch += [self._queue.get_nowait() for _ in range(self._queue.qsize())]
      if self.health is not Health.ALIVE:
        continue
      # Device arrays are copied before the lock is taken: a copy that never completes (a
      # stuck AW) must not hold restores and `kill` up with it.
      batch = [_to_host(item) for item in batch]
      with self._lock:  # once per batch: restores wait at most one batch
        self._apply_batch(batch)
      with self._count_lock:
        self.processed += len(batch)
        self._oldest_pending = None if self.processed >= self.enqueued else time.perf_counter()
      self.archive.poll()
      if time.perf_counter() - last_flush >= self.flush_interval_s:
        self._flush()
        last_flush = time.perf_counter()

  def _apply_batch(self, batch: list):
    """Applies queued items in order (the caller holds `_lock`); each AW's continuations are
    gathered and applied together, before the next item of another kind. An item that fails
    (KV of a killed AW is lost) commits nothing, and no continuation follows it."""
    runs: dict[int, list] = {}  # aw -> its continuations, in order
    for item in batch + [("end",)]:  # the sentinel applies the last runs too
      if item is None:
        continue
      if item[0] == "step" and item[3] is None:
        runs.setdefault(item[1], []).append(item)
        continue
      for aw, steps in runs.items():
        try:
          self._continue(aw, steps)
        except Exception:  # noqa: BLE001
          self._runs.pop(aw, None)
      runs.clear()
      try:
        if item[0] != "end":
          self._apply(item)
      except Exception:  # noqa: BLE001
        if item[0] == "step":
          self._runs.pop(item[1], None)

  def _continue(self, aw: int, steps: list):
    """Continuations of AW `aw` (consecutive steps, each row one position on): one host
    write and one commit per row for all of them. A step that does not follow the AW's last
    applied one, is not a decode step, or whose KV is lost, ends the run: it and the rest commit
    nothing."""
    run = self._runs.get(aw)
    arrays = []
    for _, _, seq, _, kv in steps:
      if run is None or seq != run.seq + len(arrays) + 1:
        break
      try:
        step_kv = np.asarray(kv)  # host already, unless lost (`_to_host`)
      except Exception:  # noqa: BLE001 - KV of a killed AW is lost
        break
      if step_kv.shape[3] != 1:
        break
      arrays.append(step_kv)
    if len(arrays) < len(steps):
      self._runs.pop(aw, None)
    if not arrays:
      return
    k, mirror = len(arrays), self._mirrors[aw]
    data = np.stack(arrays)  # [k, 2, L, B, 1, K, H]
    _, two, L, B, _, K, H = data.shape
    rows = data.reshape(k, two * L, B, K * H)[:, :, run.slots]  # [k, 2L, R, K*H]
    cells = run.cells[None, :] + np.arange(k)[:, None]  # [k, R]
    mirror.cells[:, cells.ravel()] = rows.transpose(1, 0, 2, 3).reshape(two * L, -1, K * H)
    log = self.log[aw]
    base = [kv.committed for kv in run.kvs]
    for j, step in enumerate(steps[:k]):
      log.append((step[2], {rid: c + j + 1 for rid, c in zip(run.rids, base)}))
    for kv in run.kvs:
      kv.committed += k
    run.seq += k
    run.cells = run.cells + k
    self.bytes_in += k * len(run.kvs) * two * L * K * H * data.itemsize

  def _apply(self, item):
    """Applies one queued item to the host tier (the caller holds `_lock`)."""
    kind = item[0]
    if kind == "step":
      _, aw, seq, rows, step_kv = item
      step_kv = np.asarray(step_kv)  # host already, unless lost (`_to_host`)
      _, L, B, _, K, H = step_kv.shape
      mirror, kvs = self._mirrors.get(aw), self._kv
      if mirror is None or B > len(mirror.owner):
        mirror = self._mirror(aw, L, B, K, H, step_kv.dtype)
      S = mirror.kv.shape[3]
      record, slots, cells, positions = {}, [], [], 0
      in_place = []  # (rid, kv, slot, next cell) of each row now in this AW's mirror
      for rid, slot, start, n in rows:
        kv = kvs.get(rid)
        if n == 1 and kv is not None and kv.slot == slot and kv.aw == aw \
            and start == kv.committed > 0:  # the common case: a decode row continues in place
          slots.append(slot)
          cells.append(slot * S + start)
        elif start > 0 and (kv is None or start > kv.committed):
          continue  # a gap (the store restarted): no restore point until a base arrives
        else:
          if kv is None or start == 0:
            kv = kvs[rid] = _RequestKV()
          self._occupy(aw, mirror, slot, rid, kv, start)
          mirror.kv[:, :, slot, start:start + n] = step_kv[:, :, slot, :n]
        kv.committed = record[rid] = start + n  # all L layers are in: the commit record
        positions += n
        in_place.append((rid, kv, slot, slot * S + start + n))
      if slots:  # every decode row of the step in one write
        new = step_kv[:, :, :, 0].reshape(2 * L, B, K * H)
        mirror.cells[:, cells] = new if slots == list(range(B)) else new[:, slots]
      self.bytes_in += positions * 2 * L * K * H * step_kv.itemsize
      log = self.log.get(aw)
      if log is None:
        log = self.log[aw] = collections.deque(maxlen=1024)
      log.append((seq, record))
      if in_place and len(in_place) == len(rows):
        rids, homes, rows_at, nxt = zip(*in_place)
        self._runs[aw] = _Run(seq, list(rids), list(homes), np.array(rows_at, np.int64),
                              np.array(nxt, np.int64))
      else:
        self._runs.pop(aw, None)
    elif kind == "base":
      _, aw, rows, k, v = item
      self._runs.pop(aw, None)
      k, v = np.asarray(k), np.asarray(v)
      mirror = self._mirror(aw, k.shape[0], k.shape[1], *k.shape[3:], k.dtype)
      for rid, slot, n in rows:
        kv = self._kv[rid] = _RequestKV()
        self._occupy(aw, mirror, slot, rid, kv, 0)
        mirror.kv[0, :, slot, :n], mirror.kv[1, :, slot, :n] = k[:, slot, :n], v[:, slot, :n]
        kv.committed = n
        self.bytes_in += 2 * k[:, slot, :n].nbytes
    elif kind == "forget":
      self._kv.pop(item[1], None)
      for aw in [aw for aw, run in self._runs.items() if item[1] in run.rids]:
        del self._runs[aw]
      self.archive.release(item[1])

  def _mirror(self, aw: int, L: int, B: int, K: int, H: int, dtype) -> _Mirror:
    """AW `aw`'s mirror, with at least B rows (made on its first step)."""
    mirror = self._mirrors.get(aw)
    if mirror is None or B > len(mirror.owner):
      grown = _Mirror(np.zeros((2, L, B, self.cfg.max_seq_len, K, H), dtype), [None] * B)
      if mirror is not None:
        b = len(mirror.owner)
        grown.kv[:, :, :b], grown.owner[:b] = mirror.kv, mirror.owner
      mirror = self._mirrors[aw] = grown
    return mirror

  def _occupy(self, aw: int, mirror: _Mirror, slot: int, rid: int, kv: _RequestKV, keep: int):
    """Makes row `slot` of AW `aw`'s mirror request `rid`'s home, keeping its first `keep`
    positions. A live request that still lives there is first copied out (its AW died and a
    replacement reused the slot before the request resumed elsewhere)."""
    if (kv.aw, kv.slot) == (aw, slot):
      return
    old = self._kv.get(mirror.owner[slot])
    if old is not None and old is not kv and (old.aw, old.slot) == (aw, slot):
      old.k = mirror.kv[0, :, slot, :old.committed].copy()
      old.v = mirror.kv[1, :, slot, :old.committed].copy()
      old.aw = old.slot = None
    if keep:  # the request resumed here (restored after a failure): bring its prefix along
      k, v = self._arrays(kv)
      mirror.kv[0, :, slot, :keep], mirror.kv[1, :, slot, :keep] = k[:, :keep], v[:, :keep]
    kv.aw, kv.slot, kv.k, kv.v = aw, slot, None, None
    mirror.owner[slot] = rid

  def _arrays(self, kv: _RequestKV) -> tuple[np.ndarray, np.ndarray]:
    """Views (k, v) [L, n, K, H] of a request's KV, wherever it lives."""
    if kv.aw is None:
      return kv.k, kv.v
    rows = self._mirrors[kv.aw].kv[:, :, kv.slot]
    return rows[0], rows[1]

  def _flush(self):
    """Stages every newly committed whole chunk (`durable_chunk` positions) for the durable
    tier.

    Whole chunks only: a partial chunk would make tensorstore read the chunk back before
    writing it. The durable tier therefore lags the host tier by < one chunk + one interval;
    each chunk is one file, so the chunk size sets the tier's cost (`experiments.
    snapshot_overhead` measures it).
    """
    if self.archive.flushing:
      return
    chunk = self.archive.chunk
    with self._lock:
      ranges: dict[tuple[int, int], list] = {}  # (lo, hi) -> [(request, k, v views)]
      for rid, kv in self._kv.items():
        hi = kv.committed // chunk * chunk
        if hi > kv.archived:
          k, v = self._arrays(kv)
          ranges.setdefault((kv.archived, hi), []).append(
              (rid, k[:, kv.archived:hi], v[:, kv.archived:hi]))
          kv.archived = hi
      todo = [(lo, items, self._copy_range(items)) for (lo, _), items in ranges.items()]
    for lo, items, kv in todo:  # one write per range of positions
      self.archive.write([rid for rid, _, _ in items], lo, kv)
    self.archive.commit()

  @staticmethod
  def _copy_range(items: list) -> np.ndarray:
    """kv [n, 2, L, len, K, H] of (request, k, v) views: copied while the lock is held (a
    mirror row may be reused after it)."""
    k0 = items[0][1]
    kv = np.empty((len(items), 2, *k0.shape), k0.dtype)
    for i, (_, k, v) in enumerate(items):
      kv[i, 0], kv[i, 1] = k, v
    return kv
