"""A worker as a failure domain: it can be killed (fail-stop) or hung, and it answers probes.

Every worker (AW, EW, snapshot store) is one `FaultDomain`. `kill` deletes every device array
the worker holds, so nothing can read them again; `hang` makes the worker silent: it accepts
calls but produces nothing and answers no probe. Callers see a dead worker as `WorkerDead` (the
"connection closed" of a real transport) and a hung one as missing output (`None`).
"""

from __future__ import annotations

import enum

import jax


class WorkerDead(RuntimeError):
  """Raised when a call reaches a worker that has failed (its arrays are gone)."""


class Health(enum.Enum):
  ALIVE = "alive"
  HUNG = "hung"
  DEAD = "dead"


class FaultDomain:
  """Mixin for workers. Subclasses set `self.name` and call `_serving()` at each entry point."""

  name: str = "?"
  health: Health = Health.ALIVE

  def probe(self) -> bool:
    """The control-channel probe: answered only by a live, responsive worker."""
    return self.health is Health.ALIVE

  def disconnected(self) -> bool:
    """True if the worker's connection is known to be closed (a process that died); workers in
    this process say so by raising WorkerDead instead."""
    return False

  def hang(self):
    if self.health is Health.ALIVE:
      self.health = Health.HUNG

  def kill(self):
    """Fail-stop: deletes every device array this worker holds; later calls raise WorkerDead."""
    self.health = Health.DEAD
    for leaf in jax.tree.leaves(vars(self)):
      if isinstance(leaf, jax.Array) and not leaf.is_deleted():
        leaf.delete()

  def _serving(self) -> bool:
    """True if the worker should do the call; False if it is hung (it stays silent).

    Raises:
      WorkerDead: the worker was killed.
    """
    if self.health is Health.DEAD:
      raise WorkerDead(f"{self.name} is dead")
    return self.health is Health.ALIVE
