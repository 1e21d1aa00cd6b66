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

  def new_store(self, cfg, directory: str, options: dict, detection,
                resilience=None) -> SnapshotStore:
    del detection, resilience  # a store thread in this process starts at once; its health
    return SnapshotStore(cfg, directory, **options)  # is what probes read

  def close(self):
    pass


def wait(out, timeout_s: float | None = None, what: str | None = None,
         setting: str | None = None):
  """A worker call's value: a local worker's as it is; a process runtime's `Pending` reply
  waited for, at most `timeout_s` and not at all once its worker's process is gone.

  Args:
    out: what the worker call returned.
    timeout_s: the longest wait for a reply (None: the bound the worker's proxy gave it, from
      the engine's `ResilienceConfig`).
    what: the operation, for errors (e.g. "aw0 warm_up").
    setting: the configuration field `timeout_s` comes from, for errors (e.g.
      "ResilienceConfig.warm_up_timeout_s").

  Raises:
    WorkerDead: the worker's process is gone (named, with its exit code where known).
    TimeoutError: no reply within the bound from a live process (the worker, the operation,
      the bound and its setting named).
    RemoteError: the call failed in the worker's process.
  """
  return out.result(timeout_s, what, setting) if hasattr(out, "arrived") else out
