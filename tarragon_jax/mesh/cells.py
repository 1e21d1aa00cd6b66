"""Device cells: the visible devices carved into attention cells, expert cells and spares.

A cell is a 1-D mesh of >= 1 devices (axis "model") and one failure domain. Layer code names
logical axes; `CellRules` maps them onto the cell's axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXIS = "model"


@dataclasses.dataclass(frozen=True)
class CellPlan:
  """How many attention (AW) and expert (EW) cells to carve, and their sizes."""

  num_aw: int = 4
  num_ew: int = 4
  devices_per_aw: int = 1
  devices_per_ew: int = 1

  def __post_init__(self):
    for name in ("num_aw", "num_ew", "devices_per_aw", "devices_per_ew"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"CellPlan: {name}={value!r} must be an int >= 1")

  @property
  def devices_needed(self) -> int:
    return self.num_aw * self.devices_per_aw + self.num_ew * self.devices_per_ew


@dataclasses.dataclass(frozen=True)
class CellRules:
  """Logical axis -> cell axis. Logical axes not named here are replicated."""

  sharded: tuple[str, ...] = ()

  def spec(self, logical: Sequence[str | None], shape: Sequence[int], size: int) -> PartitionSpec:
    """PartitionSpec for these logical axes; an axis that does not divide is replicated.

    Only the first divisible sharded axis is used (a 1-D cell shards one axis).
    """
    out: list[str | None] = [None] * len(logical)
    for i, name in enumerate(logical):
      if name in self.sharded and shape[i] % size == 0 and size > 1:
        out[i] = AXIS
        break
    return PartitionSpec(*out)


# Attention cells shard heads; expert cells shard their slot axis, else the expert hidden axis.
AW_RULES = CellRules(("q_heads", "kv_heads"))
EW_RULES = CellRules(("slots", "expert_hidden"))


@dataclasses.dataclass(frozen=True)
class Cell:
  """One worker's devices, as a mesh."""

  name: str
  devices: tuple  # tuple[jax.Device, ...]
  mesh: Mesh = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if not self.devices:
      raise ValueError(f"Cell {self.name}: a cell needs at least one device")
    mesh = Mesh(np.array(self.devices), (AXIS,), axis_types=(AxisType.Auto,))
    object.__setattr__(self, "mesh", mesh)
    object.__setattr__(self, "_replicated", NamedSharding(mesh, PartitionSpec()))

  @property
  def size(self) -> int:
    return len(self.devices)

  def replicated(self) -> NamedSharding:
    return self._replicated

  def sharding(self, rules: CellRules, logical: Sequence[str | None], shape) -> NamedSharding:
    return NamedSharding(self.mesh, rules.spec(logical, shape, self.size))

  def shardings_for(self, rules: CellRules, logical_tree, abstract_tree):
    """A tree of shardings for arrays described by `abstract_tree` (has .shape) + logical axes."""
    return jax.tree.map(lambda axes, a: self.sharding(rules, axes, a.shape), logical_tree,
                        abstract_tree, is_leaf=lambda x: isinstance(x, tuple))


@dataclasses.dataclass(frozen=True)
class Cells:
  aw: tuple[Cell, ...]
  ew: tuple[Cell, ...]
  spares: tuple  # devices not in any cell


def carve(plan: CellPlan, devices: Sequence | None = None, make_cell=Cell) -> Cells:
  """Splits devices into AW cells, then EW cells, then spares (in device order).

  `make_cell(name, devices)` builds each cell (the process runtime's cells are processes).

  Raises:
    ValueError: the plan needs more devices than are given.
  """
  devices = list(jax.devices() if devices is None else devices)
  if plan.devices_needed > len(devices):
    raise ValueError(
        f"CellPlan needs {plan.devices_needed} devices ({plan.num_aw} AW x {plan.devices_per_aw} "
        f"+ {plan.num_ew} EW x {plan.devices_per_ew}) but only {len(devices)} are available; "
        f"use fewer or smaller cells")
  it = iter(devices)

  def take(prefix: str, count: int, size: int):
    return tuple(make_cell(f"{prefix}{i}", tuple(next(it) for _ in range(size)))
                 for i in range(count))

  aw = take("aw", plan.num_aw, plan.devices_per_aw)
  ew = take("ew", plan.num_ew, plan.devices_per_ew)
  return Cells(aw, ew, tuple(it))
