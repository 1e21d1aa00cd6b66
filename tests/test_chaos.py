"""The chaos matrix: every failure the engine recovers from, checked against the fault-free run.

On 8 CPU devices: 3 AWs + 4 EWs + 1 spare, two shadows per expert (any two EWs may fail). In
every cell every request completes, its greedy tokens equal the fault-free run's, and each
token index reaches the client exactly once.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import tarragon_jax as tj
from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience.faults import parse_faults
from tarragon_jax.serving.engine import Engine, EngineConfig, ResilienceConfig
from tarragon_jax.worker.requests import Request

CFG = tj.ModelConfig(family="mixtral", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, num_experts=8, top_k=2, expert_hidden=64,
                     max_seq_len=64)
PLAN = CellPlan(3, 4)  # the 8th device is the spare
_rng = np.random.default_rng(7)
PROMPTS = [tuple(int(t) for t in _rng.integers(0, 128, n)) for n in (5, 9, 12, 3, 7, 16, 11, 4, 8)]
MAX_NEW = (24, 30, 18, 26, 22, 28, 12, 20, 25)  # 9 requests on 6 slots: late ones prefill mid-run


@functools.cache
def _params():
  return tj.init_params(CFG, jax.random.key(3))


def _engine(faults: str = "", **resilience) -> Engine:
  # Short requests: small durable chunks, flushed often (faults at `when=flush` need flushes).
  rc = ResilienceConfig(flush_interval_s=resilience.pop("flush_interval_s", 0.02),
                        durable_chunk=resilience.pop("durable_chunk", 16), **resilience)
  ec = EngineConfig(plan=PLAN, slots_per_aw=2, shadows_per_expert=2, resilience=rc)
  return Engine(CFG, _params(), ec, faults=parse_faults(faults))


def _serve(engine: Engine) -> list[list[int]]:
  ids = [engine.submit(Request(p, n)) for p, n in zip(PROMPTS, MAX_NEW)]
  engine.run()
  engine.close()
  return [engine.tokens(i) for i in ids]


@functools.cache
def _fault_free() -> tuple[tuple[int, ...], ...]:
  return tuple(tuple(t) for t in _serve(_engine()))


def _check(engine: Engine, tokens: list[list[int]]):
  """Every request complete, tokens as fault-free, each index delivered once, faults fired."""
  assert engine.injector.pending == [], "a scheduled fault never fired"
  assert engine.summary()["completed"] == len(PROMPTS)
  assert [tuple(t) for t in tokens] == list(_fault_free())
  for rid, stream in engine.streams.items():
    assert stream.mismatches == []
    indices = [ev.index for ev in engine.events if ev.request_id == rid]
    assert indices == list(range(MAX_NEW[rid])), f"request {rid}: indices {indices}"
  kinds = {(f.worker, f.kind) for f, _ in engine.injector.fired}
  declared = {ev["worker"] for ev in engine.timeline.of("declared_failed")}
  assert {w for w, k in kinds if k in ("kill", "hang")} <= declared


MATRIX = {
    # {AW, EW} x {during prefill, early decode, late decode, snapshot flush, another recovery}
    "aw_prefill": "kill:aw1@step=0,layer=1",
    "aw_early_decode": "kill:aw0@step=2,layer=1",
    "aw_late_decode": "kill:aw2@step=20,layer=0",
    "aw_during_flush": "kill:aw1@step=6,when=flush",
    "aw_during_recovery": "kill:ew0@step=4; kill:aw1@step=5,when=recovery",
    "ew_prefill": "kill:ew1@step=0,layer=1",
    "ew_early_decode": "kill:ew2@step=2,layer=0",
    "ew_late_decode": "kill:ew3@step=20,layer=1",
    "ew_during_flush": "kill:ew0@step=6,when=flush",
    "ew_during_recovery": "kill:aw0@step=4; kill:ew1@step=5,when=recovery",
    # two at once, repeated, hangs
    "aw_and_ew_together": "kill:aw1@step=6,layer=1; kill:ew2@step=6,layer=1",
    "two_ews_together": "kill:ew0@step=6,layer=0; kill:ew3@step=6,layer=0",
    "same_ew_twice": "kill:ew1@step=3; kill:ew1@step=14",
    "two_aws_in_turn": "kill:aw0@step=3; kill:aw2@step=10",
    "ew_hangs": "hang:ew2@step=5,layer=1",
    "aw_hangs": "hang:aw1@step=7,layer=0",
    "aw_dies_at_time": "kill:aw2@t=0.0",
}


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_chaos_matrix(name):
  engine = _engine(MATRIX[name])
  _check(engine, _serve(engine))


def test_store_failure_falls_back_to_reprefill_then_resumes_logging():
  engine = _engine("kill:store@step=3; kill:aw1@step=6; restart:store@step=9; "
                   "kill:aw2@step=14", replace_store=False)
  _check(engine, _serve(engine))
  modes = {r["request"]: r["mode"] for r in engine.recovery.restores}
  first = engine.timeline.of("aw_failed")[0]["requests"]
  second = engine.timeline.of("aw_failed")[1]["requests"]
  assert {modes[r] for r in first} == {"reprefill"}  # the store was down
  assert {modes[r] for r in second} == {"restore"}  # it came back and got a base snapshot
  assert engine.timeline.of("store_failed")


def test_a_hung_store_is_detected_and_replaced():
  engine = _engine("hang:store@step=3; kill:aw0@step=12")
  _check(engine, _serve(engine))
  assert engine.timeline.of("store_failed") and engine.timeline.of("store_started")
  assert {r["mode"] for r in engine.recovery.restores} == {"restore"}


def test_global_restart_baseline_recovers_every_request_from_its_prompt():
  engine = _engine("kill:ew1@step=8,layer=1; kill:aw0@step=16", recovery="global_restart",
                   snapshots=False)
  _check(engine, _serve(engine))
  restarts = engine.recovery.restarts
  assert len(restarts) == 2
  for r in restarts:
    assert set(r) >= {"teardown_s", "clear_caches_s", "weight_load_s", "rebuild_s", "compile_s"}
    assert r["recomputed_tokens"] > 0
  assert sum(s.duplicates for s in engine.streams.values()) > 0  # recomputed, checked, dropped


def test_a_fault_on_a_worker_that_does_not_exist_is_refused():
  with pytest.raises(ValueError, match="ew7.*4 EWs"):
    _engine("kill:ew7@step=1")
