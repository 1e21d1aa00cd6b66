"""The one place where arrays cross between cells.

Every cross-cell movement is an explicit `jax.device_put` (one jitted function cannot take
inputs from two meshes). `Transfers` counts the bytes it moves, for metrics and benchmarks.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Sharding


@dataclasses.dataclass
class Transfers:
  """Cross-cell copy with counters. Copies are asynchronous: they return before data lands."""

  count: int = 0
  bytes: int = 0

  def send(self, x, target: Sharding):
    """Copies a (pytree of) array(s) onto `target`, a sharding of the destination cell."""
    for leaf in jax.tree.leaves(x):
      self.count += 1
      self.bytes += leaf.size * leaf.dtype.itemsize
    return jax.device_put(x, target)

  def send_many(self, items: list[tuple]):
    """Copies many (pytree, target sharding) pairs in one call (less per-array overhead)."""
    trees = [x for x, _ in items]
    for leaf in jax.tree.leaves(trees):
      self.count += 1
      self.bytes += leaf.size * leaf.dtype.itemsize
    targets = [jax.tree.map(lambda _, t=t: t, x) for x, t in items]
    return jax.device_put(trees, targets)
