"""`GlobalRestart`: the MegaScale-like baseline, on the same model, datapath and batching.

On any AW or EW failure, everything restarts (`RestartAll`, carried out by
`resilience/restart.py`): every worker stops, compiled executables are cleared, the weights
are reloaded, the cluster is rebuilt (smaller, by whole workers of the failed kind, if the
surviving devices cannot hold it) and every in-flight request is recomputed from its prompt.
"""

from __future__ import annotations

from tarragon_jax.resilience.cluster_state import ClusterState
from tarragon_jax.resilience.policy import Action, RecoveryPolicy, RestartAll, WorkersFailed


class GlobalRestart(RecoveryPolicy):
  """Restarts everything on any AW or EW failure."""

  name = "global_restart"
  reloads_weights = True

  def workers_failed(self, state: ClusterState, event: WorkersFailed) -> list[Action]:
    return [RestartAll(shrink=(event.kind,))]
