"""The snapshot store: asynchronous, incremental KV-cache snapshots with per-request restore.

After every step each attention worker hands the store that step's new KV, every layer of it,
as device arrays (`log_step`); the call only enqueues, nothing waits on the decode path. The
store's own thread copies it to host memory in batches and appends it to a per-AW log: a step's
tokens are committed (their commit record written) once all of their layers are in host
memory, and only a row that continues its request's committed prefix is logged. Committed KV is
persisted in the background with tensorstore (`KVArchive`). An orchestrator reads a request's
last committed position and its KV back with `restore_point`.

Legend: L layers, B rows (slots) of the sending AW, T tokens per row, K kv heads, H head dim.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time

import numpy as np

from tarragon_jax.config import ModelConfig
from tarragon_jax.resilience.fault_domain import FaultDomain, Health, WorkerDead
from tarragon_jax.resilience.kv_archive import CHUNK, KVArchive


@dataclasses.dataclass
class _RequestKV:
  k: np.ndarray  # [L, capacity, K, H]
  v: np.ndarray
  committed: int = 0  # positions [0, committed) are complete in every layer
  archived: int = 0  # positions handed to the durable tier

  def ensure(self, n: int, max_len: int):
    if n > self.k.shape[1]:
      cap = min(max(n, 2 * self.k.shape[1]), max_len)
      pad = ((0, 0), (0, cap - self.k.shape[1]), (0, 0), (0, 0))
      self.k, self.v = np.pad(self.k, pad), np.pad(self.v, pad)


class SnapshotStore(FaultDomain):
  """Per-AW KV logs with commit records, host memory first, tensorstore in the background."""

  def __init__(self, cfg: ModelConfig, directory: str, flush_interval_s: float = 0.2,
               max_queue: int = 100_000, name: str = "store"):
    self.cfg, self.name = cfg, name
    self.flush_interval_s = flush_interval_s
    self.batch_s = 0.005  # the thread applies what queued up in this long (unless hurried)
    self._hurry = threading.Event()
    self.archive = KVArchive(directory, cfg)
    self._queue: queue.Queue = queue.Queue(max_queue)
    self._kv: dict[int, _RequestKV] = {}
    # aw -> its latest commit records (step seq, {request: committed positions})
    self.log: dict[int, collections.deque] = {}
    self._lock = threading.Lock()
    self.enqueued = self.processed = 0
    self.bytes_in = 0
    self._oldest_pending: float | None = None
    self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
    self._thread.start()

  # -- AW side: enqueue only ----------------------------------------------------------------

  def log_step(self, aw: int, seq: int, rows: list[tuple[int, int, int, int]], k, v):
    """Step `seq` of AW `aw`: k, v [L, B, T, K, H] (device arrays); rows are (request id, slot,
    start position, new tokens)."""
    self._put(("step", aw, seq, rows, k, v))

  def base(self, rows: list[tuple[int, int, int]], k, v):
    """A whole cache copy (k, v [L, B, T, K, H]) for rows (request id, slot, length)."""
    self._put(("base", rows, k, v))

  def forget(self, rid: int):
    """The request finished: its host and durable copies are released."""
    self._put(("forget", rid))

  def _put(self, item):
    if self.health is Health.DEAD:
      raise WorkerDead(f"{self.name} is dead")
    with self._lock:  # count only what was queued (queue.Full goes to the caller)
      self._queue.put_nowait(item)
      self.enqueued += 1
      if self._oldest_pending is None:
        self._oldest_pending = time.perf_counter()

  # -- orchestrator side --------------------------------------------------------------------

  def lag_s(self) -> float:
    """How long the oldest unprocessed item has waited (0 if the store is caught up)."""
    with self._lock:
      t = self._oldest_pending
    return 0.0 if t is None else time.perf_counter() - t

  def mark(self) -> int:
    """The count of items queued so far; wakes the store's thread to apply them now."""
    if self.health is Health.DEAD:
      raise WorkerDead(f"{self.name} is dead")
    self._hurry.set()
    return self.enqueued

  def caught_up(self, mark: int) -> bool:
    return self.processed >= mark

  @property
  def flushing(self) -> bool:
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
      n = kv.committed
      return kv.k[:, :n].copy(), kv.v[:, :n].copy()

  def stop(self):
    """Shuts the store down cleanly (the end of serving, not a failure)."""
    if self.health is not Health.DEAD:
      self.kill()
    self._thread.join()

  def kill(self):
    super().kill()
    with self._lock:
      self._kv, self.log = {}, {}
    try:
      self._queue.put_nowait(None)  # wake the thread so that it exits
    except queue.Full:
      pass

  # -- the store's thread -------------------------------------------------------------------

  def _loop(self):
    last_flush = time.perf_counter()
    while self.health is not Health.DEAD:
      if self.health is Health.HUNG:
        time.sleep(self.flush_interval_s / 10)  # a hung store does nothing at all
        continue
      batch = []
      try:  # whatever is queued is applied as one batch: fewer hand-offs of the GIL
        batch.append(self._queue.get(timeout=self.flush_interval_s / 4))
        self._hurry.wait(self.batch_s)  # let a few steps queue up: fewer thread hand-offs
        self._hurry.clear()
        while True:
          batch.append(self._queue.get_nowait())
      except queue.Empty:
        pass
      if self.health is not Health.ALIVE:
        continue
      for item in batch:
        if item is None:
          continue
        try:
          self._apply(item)
        except Exception:  # noqa: BLE001 - KV of a killed AW is lost; it never commits
          pass
      with self._lock:
        self.processed += len(batch)
        self._oldest_pending = None if self.processed >= self.enqueued else time.perf_counter()
      self.archive.poll()
      if time.perf_counter() - last_flush >= self.flush_interval_s:
        self._flush()
        last_flush = time.perf_counter()

  def _apply(self, item):
    kind = item[0]
    L, max_len = self.cfg.num_layers, self.cfg.max_seq_len
    if kind == "step":
      _, aw, seq, rows, k, v = item
      k, v = np.asarray(k), np.asarray(v)  # waits for the AW's device here, off its path
      with self._lock:
        record = {}
        for rid, slot, start, n in rows:
          kv = self._kv.get(rid)
          if start > 0 and (kv is None or start > kv.committed):
            continue  # a gap (the store restarted): no restore point until a base arrives
          kv = self._request(rid, start + n, L, max_len, fresh=start == 0)
          kv.k[:, start:start + n] = k[:, slot, :n]
          kv.v[:, start:start + n] = v[:, slot, :n]
          kv.committed = record[rid] = start + n  # all L layers are in: the commit record
          self.bytes_in += k[:, slot, :n].nbytes + v[:, slot, :n].nbytes
        self.log.setdefault(aw, collections.deque(maxlen=1024)).append((seq, record))
    elif kind == "base":
      _, rows, k, v = item
      k, v = np.asarray(k), np.asarray(v)
      with self._lock:
        for rid, slot, n in rows:
          kv = self._request(rid, n, L, max_len, fresh=True)
          kv.k[:, :n], kv.v[:, :n] = k[:, slot, :n], v[:, slot, :n]
          kv.committed = n
          self.bytes_in += k[:, slot, :n].nbytes + v[:, slot, :n].nbytes
    elif kind == "forget":
      with self._lock:
        self._kv.pop(item[1], None)
      self.archive.release(item[1])

  def _request(self, rid, n, L, max_len, fresh: bool = False) -> _RequestKV:
    kv = self._kv.get(rid)
    if kv is None or fresh:
      shape = (L, max(16, n), self.cfg.num_kv_heads, self.cfg.head_dim)
      kv = _RequestKV(np.zeros(shape, self.cfg.dtype), np.zeros(shape, self.cfg.dtype))
      self._kv[rid] = kv
    kv.ensure(n, max_len)
    return kv

  def _flush(self):
    """Stages every newly committed whole chunk (16 positions) for the durable tier.

    Whole chunks only: a partial chunk would make tensorstore read the chunk back before
    writing it. The durable tier therefore lags the host tier by < 16 tokens + one interval.
    """
    if self.archive.flushing:
      return
    with self._lock:
      todo = []
      for rid, kv in self._kv.items():
        hi = kv.committed // CHUNK * CHUNK
        if hi > kv.archived:
          todo.append((rid, kv.archived, kv.k[:, kv.archived:hi].copy(),
                       kv.v[:, kv.archived:hi].copy()))
          kv.archived = hi
    for rid, lo, k, v in todo:
      self.archive.write(rid, lo, k, v)
    self.archive.commit()
