"""The durable tier of the snapshot store: committed KV written with tensorstore (zarr v3).

Layout under the archive directory, readable with the standard tensorstore/zarr reader:

  kv             one zarr3 array [R, 2, L, max_seq_len, K, H] (R request slots, k then v),
                 one chunk (file) per request slot and `chunk` positions (64 by default);
                 grows when slots run out
  commits.json   {"<request id>": {"slot": r, "n": n}}: positions [0, n) of that request are
                 on disk in kv[r]

Background writes must stay cheap: the tensorstore I/O threads share the CPU with serving. Hence
one array opened once (not a zarr array per request: creating one is dear) and one transaction per
flush (not one write per request). `commits.json` is replaced atomically (tensorstore's file
kvstore, asynchronously: a slow disk never holds up the store's thread) and only after the
transaction it covers has committed, so a reader never sees a commit whose data is missing.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import tensorstore as ts

from tarragon_jax.config import ModelConfig

CHUNK = 64  # positions per chunk file, by default


def _spec(directory: str) -> dict:
  return {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(directory, "kv")}}


class KVArchive:
  """Writes committed KV ranges in the background (tensorstore's own I/O threads).

  Nothing here waits for the disk: data goes out in one transaction per flush, and the commit
  file is written asynchronously too (through tensorstore's file kvstore, atomically), one
  version at a time, each only after the data it lists has landed. A slot the commit file on
  disk still lists is never written: a released (or rewritten) request's slot is retired and
  reused only once a commit file without it has landed.
  """

  def __init__(self, directory: str, cfg: ModelConfig, capacity: int = 256, chunk: int = CHUNK):
    self.directory, self.cfg, self.chunk = directory, cfg, chunk
    os.makedirs(directory, exist_ok=True)
    shape = [capacity, 2, cfg.num_layers, cfg.max_seq_len, cfg.num_kv_heads, cfg.head_dim]
    spec = _spec(directory)
    spec["metadata"] = {
        "shape": shape, "data_type": np.dtype(cfg.dtype).name,
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [1, 2, shape[2], chunk, *shape[4:]]}}}
    # No fsync per file: the tier must outlive the store's process (a killed process's writes
    # are in the page cache), not the host; fsync doubled the tier's CPU cost.
    context = ts.Context({"file_io_sync": False})
    self._array = ts.open(spec, create=True, delete_existing=True, context=context).result()
    self._files = ts.KvStore.open({"driver": "file", "path": directory + os.sep},
                                  context=context).result()
    self._slot: dict[int, int] = {}  # request -> the slot its KV is written to
    self._free = list(range(capacity))[::-1]
    self._retired: list[int] = []  # slots to reuse once the commit file on disk omits them
    self._txn: ts.Transaction | None = None  # the flush being assembled
    self._pending: list = []  # commit future of the flush in flight
    self._pending_commits: dict[int, int] = {}  # request -> positions, once `_pending` lands
    self._landed: dict[int, tuple[int, int]] = {}  # request -> (slot, n) whose data landed
    self._dirty = False  # `_landed` differs from the commit file being (or last) written
    self._publishing: tuple | None = None  # (future, content) of the commit file in flight
    self.durable: dict[int, int] = {}  # request -> positions on disk (in the commit file)
    self.bytes_written = 0
    self._start_publish()
    self.poll_until_idle()

  @property
  def flushing(self) -> bool:
    """Whether a data or commit-file write is in flight or due."""
    return bool(self._pending) or self._publishing is not None or self._dirty

  def write(self, rids: list[int], lo: int, kv: np.ndarray):
    """Queues positions [lo, lo + n) of requests `rids`; kv [len(rids), 2, L, n, K, H] (k, v).

    One tensorstore write for all of them (a write has a fixed cost on the store's thread, so a
    flush writes each range of positions once, not once per request).
    """
    for rid in rids:
      if lo == 0 and rid in self._slot:  # recomputed from scratch: a new slot (the commit
        self._retire(rid)                # file may still list the old copy)
      if rid not in self._slot:
        self._slot[rid] = self._take_slot()
    hi = lo + kv.shape[3]
    if self._txn is None:
      self._txn = ts.Transaction()
    self._array.with_transaction(self._txn).oindex[[self._slot[r] for r in rids], :, :, lo:hi] \
        .write(kv).result()  # staged in the transaction's memory; no I/O yet
    for rid in rids:
      self._pending_commits[rid] = hi
    self.bytes_written += kv.nbytes

  def commit(self):
    """Starts writing everything staged since the last commit (tensorstore's I/O threads)."""
    if self._txn is not None:
      self._pending.append(self._txn.commit_async())
      self._txn = None

  def release(self, rid: int):
    """The request finished: it leaves the next commit file; its slot is reused after that."""
    self._pending_commits.pop(rid, None)
    if rid in self._slot:
      self._retire(rid)

  def poll(self) -> bool:
    """Advances the background writes without waiting; True if a commit file landed."""
    landed = False
    if self._publishing is not None and self._publishing[0].done():
      future, content = self._publishing
      future.result()
      self._publishing = None
      self.durable = {r: n for r, (_, n) in content.items()}
      listed = {slot for slot, _ in content.values()}
      self._free.extend(s for s in self._retired if s not in listed)
      self._retired = [s for s in self._retired if s in listed]
      landed = True
    if self._pending and all(f.done() for f in self._pending):
      for f in self._pending:
        f.result()
      self._pending = []
      self._landed.update({r: (self._slot[r], n) for r, n in self._pending_commits.items()
                           if r in self._slot})
      self._pending_commits = {}
      self._dirty = True
    if self._dirty and self._publishing is None:
      self._start_publish()
    return landed

  def poll_until_idle(self, timeout_s: float = 60.0):
    """Waits for every write in flight (tests, and the initial empty commit file)."""
    deadline = time.perf_counter() + timeout_s
    while self.flushing:
      if time.perf_counter() > deadline:
        raise TimeoutError(f"{self.directory}: durable writes still in flight after {timeout_s} s")
      self.poll()
      time.sleep(1e-3)

  def _retire(self, rid: int):
    self._retired.append(self._slot.pop(rid))
    if self._landed.pop(rid, None) is not None:
      self._dirty = True

  def _take_slot(self) -> int:
    if not self._free:
      capacity = self._array.shape[0]
      self._array = self._array.resize(exclusive_max=[2 * capacity, *self._array.shape[1:]]
                                       ).result()
      self._free = list(range(capacity, 2 * capacity))[::-1]
    return self._free.pop()

  def _start_publish(self):
    content = dict(self._landed)
    body = json.dumps({str(r): {"slot": slot, "n": n} for r, (slot, n) in content.items()})
    self._publishing = (self._files.write("commits.json", body.encode()), content)
    self._dirty = False


class ArchiveError(RuntimeError):
  """The durable tier cannot give back what its commit file lists."""


def read_archive(directory: str, rid: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads request `rid`'s durable KV [L, n, K, H] with the standard zarr3 reader.

  Raises:
    KeyError: the commit file does not list the request.
    ArchiveError: the commit file is missing or unreadable, or a chunk it lists is (never the
      fill value that tensorstore would read for a missing chunk: zeros are not the KV).
  """
  path = os.path.join(directory, "commits.json")
  try:
    with open(path) as f:
      entry = json.load(f).get(str(rid))
    if entry is not None:
      slot, n = int(entry["slot"]), int(entry["n"])
  except (OSError, ValueError, AttributeError, KeyError, TypeError) as err:
    raise ArchiveError(f"{path}: the commit file is missing or unreadable: {err!r}") from err
  if entry is None:
    raise KeyError(f"{directory}: request {rid} has no durable snapshot")
  where = f"{directory}: request {rid} (slot {slot}, positions [0, {n}))"
  try:
    array = ts.open({**_spec(directory), "fill_missing_data_reads": False}).result()
  except ValueError as err:
    raise ArchiveError(f"{where}: its kv array cannot be opened: {err}") from err
  try:
    kv = array[slot, :, :, :n].read().result()
  except ValueError as err:
    raise ArchiveError(f"{where}: positions {_unreadable(array, slot, n)} are missing or "
                       f"unreadable: {err}") from err
  return np.asarray(kv[0]), np.asarray(kv[1])


def _unreadable(array: ts.TensorStore, slot: int, n: int) -> str:
  """The ranges of positions [0, n) of `slot` whose chunks cannot be read: "[16, 32), ..."."""
  chunk, bad = array.chunk_layout.read_chunk.shape[3], []
  for lo in range(0, n, chunk):
    hi = min(lo + chunk, n)
    try:
      array[slot, :, :, lo:hi].read().result()
    except ValueError:
      if bad and bad[-1][1] == lo:
        bad[-1][1] = hi
      else:
        bad.append([lo, hi])
  return ", ".join(f"[{lo}, {hi})" for lo, hi in bad) or "(none, read again)"
