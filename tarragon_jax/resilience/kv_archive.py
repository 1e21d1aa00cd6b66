"""The durable tier of the snapshot store: committed KV written with tensorstore (zarr v3).

Layout under the archive directory, readable with the standard tensorstore/zarr reader:

  req<id>/k, req<id>/v   zarr3 arrays [L, max_seq_len, K, H], one chunk per 16 positions
  commits.json           {"<id>": n, ...}: positions [0, n) of each request are on disk

`commits.json` is replaced atomically and only after the writes it covers have completed, so a
reader never sees a commit whose data is missing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorstore as ts

from tarragon_jax.config import ModelConfig

CHUNK = 16


def _spec(path: str, cfg: ModelConfig | None = None) -> dict:
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
  if cfg is not None:
    shape = [cfg.num_layers, cfg.max_seq_len, cfg.num_kv_heads, cfg.head_dim]
    spec["metadata"] = {
        "shape": shape, "data_type": np.dtype(cfg.dtype).name,
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [shape[0], CHUNK, *shape[2:]]}}}
  return spec


class KVArchive:
  """Writes committed KV ranges in the background (tensorstore's own I/O threads)."""

  def __init__(self, directory: str, cfg: ModelConfig):
    self.directory, self.cfg = directory, cfg
    os.makedirs(directory, exist_ok=True)
    self._arrays: dict[int, tuple] = {}
    self._pending: list = []  # write futures of the current flush
    self._pending_commits: dict[int, int] = {}
    self.durable: dict[int, int] = {}  # request -> positions on disk (committed file)
    self.bytes_written = 0

  @property
  def flushing(self) -> bool:
    return bool(self._pending)

  def _open(self, rid: int):
    if rid not in self._arrays:
      base = os.path.join(self.directory, f"req{rid}")
      self._arrays[rid] = tuple(
          ts.open(_spec(os.path.join(base, name), self.cfg), create=True, delete_existing=True
                  ).result() for name in ("k", "v"))
    return self._arrays[rid]

  def write(self, rid: int, lo: int, k: np.ndarray, v: np.ndarray):
    """Queues positions [lo, lo + n) of request `rid`; k, v [L, n, K, H]."""
    if lo == 0 and rid in self._arrays:
      self._arrays.pop(rid)  # a request recomputed from scratch starts a fresh archive
    ka, va = self._open(rid)
    hi = lo + k.shape[1]
    self._pending += [ka[:, lo:hi].write(k), va[:, lo:hi].write(v)]
    self._pending_commits[rid] = hi
    self.bytes_written += k.nbytes + v.nbytes

  def poll(self) -> bool:
    """Publishes the commit file once every queued write has landed; True if it did."""
    if not self._pending or not all(f.done() for f in self._pending):
      return False
    for f in self._pending:
      f.result()
    self._pending = []
    self.durable.update(self._pending_commits)
    self._pending_commits = {}
    tmp = os.path.join(self.directory, "commits.json.tmp")
    with open(tmp, "w") as f:
      json.dump({str(r): n for r, n in self.durable.items()}, f)
    os.replace(tmp, os.path.join(self.directory, "commits.json"))
    return True


def read_archive(directory: str, rid: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads request `rid`'s durable KV [L, n, K, H] with the standard zarr3 reader."""
  with open(os.path.join(directory, "commits.json")) as f:
    n = json.load(f).get(str(rid), 0)
  base = os.path.join(directory, f"req{rid}")
  k, v = (ts.open(_spec(os.path.join(base, name))).result()[:, :n].read().result()
          for name in ("k", "v"))
  return np.asarray(k), np.asarray(v)
