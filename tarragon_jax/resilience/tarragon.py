"""`Tarragon`: repair only what failed.

- EW failure: the AWs route around it at once under a new table (its experts served by their
  shadows; the AWs that had sent it tokens replay the layer, see `Engine.run_layer`), and a
  replacement is built on spare devices while serving goes on; it joins at a layer boundary.
  An expert left with no live replica waits for a replacement that is being built, started at
  once (a stall); without one it stays unreachable, and a token routed to it fails its request.
- AW failure: its requests go back to the front of the queue; placed on a surviving AW, each
  is restored from its last committed token in the snapshot store (only the uncommitted tail
  is recomputed), or re-prefilled if the store has nothing. A replacement AW is built after
  the step that serves the restored requests has run, so that the two do not compete.
"""

from __future__ import annotations

from tarragon_jax.resilience.cluster_state import ClusterState
from tarragon_jax.resilience.policy import (
  Action,
  AwaitReplacements,
  RecoveryPolicy,
  Replace,
  Requeue,
  Reroute,
  WorkersFailed,
)


class Tarragon(RecoveryPolicy):
  """Per-worker recovery: shadows and replay for EWs, per-request restore for AWs."""

  name = "tarragon"

  def workers_failed(self, state: ClusterState, event: WorkersFailed) -> list[Action]:
    replace = self.resilience.replace_failed
    if event.kind == "aw":
      return [a for aw in event.indices
              for a in [Requeue(aw, "restore")] + ([Replace("aw", aw)] if replace else [])]
    table = state.table_around(state.failed_ews)
    # Experts left with no live replica: build their EWs now and wait (nothing else can serve
    # those experts); otherwise build after the step that runs on the shadows.
    coming = any(kind == "ew" for kind, _ in state.coming)
    wait = bool(table.unreachable()) and (coming or replace and bool(state.spares))
    return ([Reroute(table)] + [Replace("ew", m, defer=not wait) for m in event.indices if replace]
            + ([AwaitReplacements()] if wait else []))
