"""The local runtime: every worker in this process, on its own cell of this process's devices."""

from __future__ import annotations

import jax

from tarragon_jax.mesh.cells import carve
from tarragon_jax.mesh.transfer import Transfers
from tarragon_jax.resilience.snapshot_store import SnapshotStore


class LocalRuntime:
  remote = False

  def devices(self) -> list:
    return list(jax.devices())

  def carve(self, plan, devices):
    return carve(plan, devices)

  def transfers(self) -> Transfers:
    return Transfers()

  def new_store(self, cfg, directory: str, options: dict, detection) -> SnapshotStore:
    del detection  # a store thread in this process is probed through its health
    return SnapshotStore(cfg, directory, **options)

  def close(self):
    pass


def wait(out, timeout_s: float = 600.0):
  """A worker call's value: a process runtime's `Pending` reply is waited for."""
  return out.result(timeout_s) if hasattr(out, "arrived") else out
