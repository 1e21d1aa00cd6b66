"""Recovery policies: the built-in ones decide from the cluster's state alone, and a new one is
a class named in the config (tests/toy_policy.py), with no change to the engine."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import tarragon_jax as tj
from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience.cluster_state import ClusterState
from tarragon_jax.resilience.faults import parse_faults
from tarragon_jax.resilience.global_restart import GlobalRestart
from tarragon_jax.resilience.policy import (
  AwaitReplacements,
  Join,
  Replace,
  ReplacementReady,
  Requeue,
  Reroute,
  RestartAll,
  StartStore,
  StoreFailed,
  WorkersFailed,
)
from tarragon_jax.resilience.routing_table import RoutingTable
from tarragon_jax.resilience.tarragon import Tarragon
from tarragon_jax.serving.engine import Engine, EngineConfig, ResilienceConfig
from tarragon_jax.worker.placement import place
from tarragon_jax.worker.requests import Request

CFG = tj.ModelConfig(family="qwen3_moe", qk_norm=True, vocab_size=128, hidden_size=32,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=8,
                     top_k=2, expert_hidden=64, max_seq_len=64)
_rng = np.random.default_rng(3)
PROMPTS = [tuple(int(t) for t in _rng.integers(0, 128, n)) for n in (6, 10, 3, 13, 8, 5)]
MAX_NEW = 12
PLAN = CellPlan(2, 4)  # 2 AWs, 4 EWs, 2 spare devices


@functools.cache
def _params():
  return tj.init_params(CFG, jax.random.key(2))


def _serve(recovery: str, faults: str = "") -> tuple[Engine, list[int]]:
  engine = Engine(CFG, _params(), EngineConfig(plan=PLAN, slots_per_aw=4, resilience=(
      ResilienceConfig(recovery=recovery, flush_interval_s=0.02))), faults=parse_faults(faults))
  ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
  engine.run()
  engine.close()
  return engine, ids


@functools.cache
def _fault_free() -> list[tuple[int, ...]]:
  engine, ids = _serve("tarragon")
  return [tuple(engine.tokens(i)) for i in ids]


def _state(spares: int = 2, failed_ews=()) -> ClusterState:
  placement = place(CFG.num_layers, CFG.num_experts, 4, None, 1)
  table = RoutingTable.from_placement(placement)
  return ClusterState(plan=PLAN, placement=placement, aws=[None, None], ews=[None] * 4,
                      slot_owner=[[0, 1, -1, -1], None], base_table=table, table=table,
                      spares=list(range(spares)), failed_ews=set(failed_ews))


# -- the built-in policies decide from the state alone -----------------------------------------


def test_tarragon_routes_around_a_failed_ew_and_builds_its_replacement_after_the_step():
  state = _state(failed_ews={1})
  (reroute, replace) = Tarragon(ResilienceConfig()).on_event(state,
                                                             WorkersFailed("ew", (1,), 0))
  assert replace == Replace("ew", 1, defer=True)
  assert isinstance(reroute, Reroute) and reroute.table.epoch == state.table.epoch + 1
  assert 1 not in reroute.table.ews_serving() and not reroute.table.unreachable()


def test_tarragon_waits_for_replacements_when_experts_have_no_replica_left():
  state = _state(failed_ews={0, 1, 2})  # one shadow per expert: some experts lose both
  actions = Tarragon(ResilienceConfig()).on_event(state, WorkersFailed("ew", (0, 1, 2), 1))
  assert actions[0].table.unreachable()
  assert actions[1:] == [Replace("ew", m, defer=False) for m in (0, 1, 2)] + [AwaitReplacements()]
  no_spares = Tarragon(ResilienceConfig()).on_event(_state(0, {0, 1, 2}),
                                                    WorkersFailed("ew", (0, 1, 2), 1))
  assert AwaitReplacements() not in no_spares  # nothing is coming: do not wait


def test_tarragon_requeues_a_failed_aws_requests_to_restore_them():
  actions = Tarragon(ResilienceConfig(replace_failed=False)).on_event(
      _state(), WorkersFailed("aw", (1,), 2))
  assert actions == [Requeue(1, "restore")]


def test_the_baseline_restarts_everything_and_the_defaults_join_and_restart_the_store():
  state = _state(failed_ews={3})
  policy = GlobalRestart(ResilienceConfig())
  assert policy.on_event(state, WorkersFailed("ew", (3,), 0)) == [RestartAll(shrink=("ew",))]
  join, reroute = policy.on_event(state, ReplacementReady("ew", 3))
  assert join == Join("ew", 3) and reroute.table.ews_serving() == {0, 1, 2, 3}
  assert policy.on_event(state, StoreFailed()) == [StartStore()]
  assert GlobalRestart(ResilienceConfig(replace_store=False)).on_event(state, StoreFailed()) == []


# -- a new policy is a class named in the config -------------------------------------------------


def test_a_policy_of_ones_own_serves_through_failures_without_touching_the_engine():
  engine, ids = _serve("toy_policy:ReprefillNoReplacements",
                       "kill:aw1@step=4,layer=1;kill:ew2@step=7,layer=0")
  assert [tuple(engine.tokens(i)) for i in ids] == _fault_free()
  assert [(ev.kind, ev.indices) for ev in engine.recovery.policy.events] == [
      ("aw", (1,)), ("ew", (2,))]
  assert engine.timeline.of("aw_failed") and not engine.timeline.of("restore")  # re-prefilled
  assert not engine.timeline.of("replacement_started")  # it builds none
  assert engine.state.failed_ews == {2} and engine.state.live_aws() == [0]


def test_a_policy_that_fails_requests_fails_only_those_of_the_failed_aw():
  engine, ids = _serve("toy_policy:FailFast", "kill:aw0@step=4")
  (failed,) = engine.timeline.of("aw_failed")
  for i, want in zip(ids, _fault_free()):
    if i in failed["requests"]:
      assert "fail_fast does not recover requests" in str(engine.error(i))
    else:
      assert engine.error(i) is None and tuple(engine.tokens(i)) == want


def test_requests_a_policy_forgets_fail_instead_of_waiting():
  engine, ids = _serve("toy_policy:Forgetful", "kill:aw0@step=4")
  (failed,) = engine.timeline.of("aw_failed")
  assert failed["requests"]
  for i in failed["requests"]:
    assert "'forgetful' neither requeued nor failed" in str(engine.error(i))
  assert all(engine.error(i) is None for i in ids if i not in failed["requests"])


@pytest.mark.parametrize("name,match", [
    ("toy_policy:Nope", "no such policy"),
    ("no_such_module:Policy", "no such policy"),
    ("toy_policy:FailRequests", "is not a RecoveryPolicy subclass"),
    ("tarragonn", "is not a built-in policy; use one of")])
def test_a_policy_that_cannot_be_found_is_refused_by_the_config(name, match):
  with pytest.raises(ValueError, match=match):
    ResilienceConfig(recovery=name)
