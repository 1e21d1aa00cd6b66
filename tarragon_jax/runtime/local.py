"""The local runtime: every worker in this process, on its own cell of this process's devices."""

from __future__ import annotations

import jax

from tarragon_jax.mesh.cells import carve
from tarragon_jax.resilience.snapshot_store import SnapshotStore
from tarragon_jax.worker.dataplane import LocalPlane


class LocalRuntime:
  remote = False
  # The workers are cooperative: one thread calls them phase by phase (a worker that ran a
  # whole step itself would wait for EWs that this same thread has not run yet).
  autonomous = False

  def devices(self) -> list:
    return list(jax.devices())

  def nodes(self) -> list[list]:
    """The devices of each node that can fail as a whole: none here (one process)."""
    return []

  def carve(self, plan, devices):
    return carve(plan, devices)

  def data_plane(self) -> LocalPlane:
    """The control plane's own link to the workers' data planes (it sends no arrays)."""
    return LocalPlane(None)

  def new_store(self, cfg, directory: str, options: dict, detection,
                resilience=None) -> SnapshotStore:
    del detection, resilience  # a store thread in this process starts at once; its health
    return SnapshotStore(cfg, directory, **options)  # is what probes read

  def close(self):
    pass

