"""The cluster as the control plane knows it: members, slot ownership, routing, spares, store.

One explicit value, owned by the control plane (`Engine`) and handed to the recovery policies
(`resilience/policy.py`), which read it to decide what to do and never write it: the actions
they return are carried out by `Recovery` (`resilience/recovery.py`), the one place that
changes the cluster's membership.
"""

from __future__ import annotations

import dataclasses

from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience.routing_table import RoutingTable
from tarragon_jax.worker.fault_domain import FaultDomain
from tarragon_jax.worker.placement import Placement


@dataclasses.dataclass
class ClusterState:
  """Who serves what, right now.

  An AW position whose `slot_owner` is None, and an EW position in `failed_ews`, hold a worker
  that was declared failed and fenced; a replacement takes its position when it joins.
  """

  plan: CellPlan
  placement: Placement  # which EW slot holds which expert (fixed for the cluster's life)
  aws: list[FaultDomain]  # [num_aw], by position
  ews: list[FaultDomain]  # [num_ew], by position
  slot_owner: list[list[int] | None]  # [num_aw][slots_per_aw]: request id, -1 free; None: failed
  base_table: RoutingTable  # every replica of the placement (no failures)
  table: RoutingTable  # the table the AWs route by now
  spares: list  # devices free for replacements
  failed_ews: set[int] = dataclasses.field(default_factory=set)
  lost_devices: list = dataclasses.field(default_factory=list)  # devices that failed with a cell
  store: FaultDomain | None = None  # the snapshot store (None: none running)
  coming: set[tuple[str, int]] = dataclasses.field(default_factory=set)  # (kind, index) built

  def live_aws(self) -> list[int]:
    """Positions of the AWs that may take requests."""
    return [a for a, owners in enumerate(self.slot_owner) if owners is not None]

  def live_ews(self) -> list[int]:
    return [m for m in range(len(self.ews)) if m not in self.failed_ews]

  def requests_on(self, aw: int) -> list[int]:
    """The ids of the requests AW `aw` holds (none if it was declared failed)."""
    return [r for r in (self.slot_owner[aw] or []) if r >= 0]

  def table_around(self, failed_ews) -> RoutingTable:
    """The base table with every replica on `failed_ews` removed, one epoch after the current
    table's (experts with no live replica left are unreachable: -1)."""
    table = self.base_table
    for m in sorted(failed_ews):
      table = table.without_ew(m)
    return dataclasses.replace(table, epoch=self.table.epoch + 1)
