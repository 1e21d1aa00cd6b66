"""The recovery-policy protocol: given the cluster's state and an event, the actions to take.

A policy decides; `Recovery` (`resilience/recovery.py`) carries the decision out. A policy reads
the `ClusterState` and never changes it, so it can be written, read and tested alone: it is one
class with one method, `on_event`. The built-in policies are `Tarragon`
(`resilience/tarragon.py`: repair only what failed) and `GlobalRestart`
(`resilience/global_restart.py`: the baseline). A new one is a file with a `RecoveryPolicy`
subclass, chosen by `ResilienceConfig(recovery="package.module:ClassName")`.

What is not the policy's to decide, because correctness depends on it, `Recovery` always does:
a worker declared failed is fenced before the policy hears of it (fail-stop: it is never
talked to again); a request left on a fenced AW that the policy neither requeues nor fails
fails with an error naming the policy; a new snapshot store is sent every live request's KV.
"""

from __future__ import annotations

import dataclasses

from tarragon_jax.resilience.cluster_state import ClusterState
from tarragon_jax.resilience.routing_table import RoutingTable

# -- events ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkersFailed:
  """Workers of one kind were declared failed (and fenced) at the same point of a step."""

  kind: str  # "aw" | "ew"
  indices: tuple[int, ...]
  layer: int  # where the exchange found it: 0..num_layers (num_layers: at sampling)


@dataclasses.dataclass(frozen=True)
class ReplacementReady:
  """A replacement (`Replace`) is built and compiled; it serves once it `Join`s."""

  kind: str
  index: int


@dataclasses.dataclass(frozen=True)
class ReplacementFailed:
  """A replacement could not be built (its devices went back to the spares)."""

  kind: str
  index: int
  error: str


@dataclasses.dataclass(frozen=True)
class StoreFailed:
  """The snapshot store died or stopped draining (it is stopped; the cluster has none)."""


Event = WorkersFailed | ReplacementReady | ReplacementFailed | StoreFailed

# -- actions ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Requeue:
  """The requests of fenced AW `aw` go back to the front of the queue; when placed on a live
  AW each resumes by `"restore"` (from its last committed token in the snapshot store; a
  request with nothing committed re-prefills) or by `"reprefill"` (from its prompt; tokens
  the client has are recomputed, checked and dropped by its stream)."""

  aw: int
  resume: str = "restore"

  def __post_init__(self):
    if self.resume not in ("restore", "reprefill"):
      raise ValueError(f"Requeue: resume={self.resume!r}; use 'restore' or 'reprefill'")


@dataclasses.dataclass(frozen=True)
class FailRequests:
  """The requests of fenced AW `aw` end with `cause` on their streams."""

  aw: int
  cause: str


@dataclasses.dataclass(frozen=True)
class Reroute:
  """Installs `table` on every live AW (it may leave experts unreachable: a token routed to
  one fails its request; it may not route to a failed EW)."""

  table: RoutingTable


@dataclasses.dataclass(frozen=True)
class Replace:
  """Builds a replacement for position (`kind`, `index`) on spare devices, off the serving
  thread. `defer`: start it only after the step that serves the failure has run, so that the
  build does not compete with restoring service. Without spares, nothing is built."""

  kind: str
  index: int
  defer: bool = True


@dataclasses.dataclass(frozen=True)
class AwaitReplacements:
  """Blocks until every replacement being built has finished (each at most its
  `build_timeout_s`); their `ReplacementReady` / `ReplacementFailed` events are handled before
  this action returns. A stall, recorded in the timeline."""


@dataclasses.dataclass(frozen=True)
class Join:
  """The built replacement for (`kind`, `index`) takes its position now (a layer boundary).
  An EW's position serves again only under a table that routes to it (`Reroute`)."""

  kind: str
  index: int


@dataclasses.dataclass(frozen=True)
class StartStore:
  """Starts a new snapshot store (every live request's KV is sent to it)."""


@dataclasses.dataclass(frozen=True)
class RestartAll:
  """Stops every worker, clears compiled executables, reloads the weights, rebuilds the
  cluster (shrunk by whole workers of the `shrink` kinds if the surviving devices cannot hold
  it) and recomputes every in-flight request from its prompt."""

  shrink: tuple[str, ...] = ()


Action = (Requeue | FailRequests | Reroute | Replace | AwaitReplacements | Join | StartStore
          | RestartAll)


class RecoveryPolicy:
  """Decides what to do when workers fail, a replacement is ready, or the store fails.

  `on_event` is the protocol; this base class dispatches it by event type to one method each,
  with defaults that a policy keeps or overrides: a ready replacement joins (an EW under a
  table that routes to it again), a failed one is left alone, a failed store is replaced
  when `replace_store` says so. `workers_failed` has no default.

  Args:
    resilience: the engine's `ResilienceConfig` (e.g. `replace_failed`, `replace_store`).
  """

  name = "policy"
  # Whether its actions include `RestartAll`, which reloads every weight from a checkpoint
  # (an engine given none saves one); a replacement copies its weights from live peers.
  reloads_weights = False

  def __init__(self, resilience):
    self.resilience = resilience

  def on_event(self, state: ClusterState, event: Event) -> list[Action]:
    """The actions to take, in order. `state` is read only."""
    if isinstance(event, WorkersFailed):
      return self.workers_failed(state, event)
    if isinstance(event, ReplacementReady):
      return self.replacement_ready(state, event)
    if isinstance(event, ReplacementFailed):
      return self.replacement_failed(state, event)
    if isinstance(event, StoreFailed):
      return self.store_failed(state, event)
    raise TypeError(f"{type(self).__name__}.on_event: unknown event {event!r}")

  def workers_failed(self, state: ClusterState, event: WorkersFailed) -> list[Action]:
    raise NotImplementedError(f"{type(self).__name__} does not say what to do when workers fail")

  def replacement_ready(self, state: ClusterState, event: ReplacementReady) -> list[Action]:
    actions: list[Action] = [Join(event.kind, event.index)]
    if event.kind == "ew":
      actions.append(Reroute(state.table_around(state.failed_ews - {event.index})))
    return actions

  def replacement_failed(self, state: ClusterState, event: ReplacementFailed) -> list[Action]:
    return []

  def store_failed(self, state: ClusterState, event: StoreFailed) -> list[Action]:
    return [StartStore()] if self.resilience.replace_store else []
