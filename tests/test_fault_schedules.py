"""Random fault schedules: whatever fails, no request gets a wrong, lost or doubled token.

Seeded schedules of kills and hangs of AWs, EWs and the snapshot store, store restarts, faults in
the same step and layer, with and without spare devices (so that spares run out). For every
schedule: the run ends; every request either completes with the fault-free tokens or ends with
its own error after a prefix of them; every index reaches the client once.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import tarragon_jax as tj
from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience.faults import Fault
from tarragon_jax.runtime.remote import ProcessRuntime
from tarragon_jax.runtime.spawner import LocalSpawner
from tarragon_jax.serving.engine import Engine, EngineConfig, ResilienceConfig
from tarragon_jax.worker.requests import Request

CFG = tj.ModelConfig(family="mixtral", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, num_experts=8, top_k=2, expert_hidden=64,
                     max_seq_len=64)
_rng = np.random.default_rng(23)
PROMPTS = [tuple(int(t) for t in _rng.integers(0, 128, n)) for n in (5, 9, 12, 3, 7, 16, 4, 10)]
MAX_NEW = (14, 18, 10, 16, 12, 15, 9, 13)  # 8 requests on 6 slots: late ones prefill mid-run
LOCAL_PLANS = {"spare": (CellPlan(3, 4), 8), "no_spare": (CellPlan(3, 4), 7)}  # (plan, devices)
LOCAL_SCHEDULES = 32
PROCESS_SCHEDULES = 3


@functools.cache
def _params():
  return tj.init_params(CFG, jax.random.key(3))


def _engine(faults, plan, devices, shadows, runtime=None) -> Engine:
  rc = ResilienceConfig(flush_interval_s=0.02, durable_chunk=16)
  ec = EngineConfig(plan=plan, slots_per_aw=2, shadows_per_expert=shadows, resilience=rc)
  if runtime is None:
    devices = jax.devices()[:devices]
  return Engine(CFG, _params(), ec, devices=devices if runtime is None else None,
                faults=faults, runtime=runtime)


def _serve(engine: Engine) -> dict[int, tuple]:
  with engine:
    ids = [engine.submit(Request(p, n)) for p, n in zip(PROMPTS, MAX_NEW)]
    engine.run()
    return {rid: (tuple(engine.tokens(rid)), engine.error(rid)) for rid in ids}


@functools.cache
def _fault_free(plan: CellPlan, devices: int, shadows: int, process: bool = False):
  runtime = ProcessRuntime(LocalSpawner(slots=devices)) if process else None
  out = _serve(_engine((), plan, devices, shadows, runtime))
  assert all(err is None for _, err in out.values())
  return {rid: tokens for rid, (tokens, _) in out.items()}


def schedule(seed: int, num_aw: int, num_ew: int, max_step: int = 20) -> tuple[Fault, ...]:
  """One to four faults: kills and hangs of workers and the store, store restarts; a third of
  the time two of them in the same step and layer."""
  rng = np.random.default_rng(seed)
  workers = [f"aw{i}" for i in range(num_aw)] + [f"ew{i}" for i in range(num_ew)] + ["store"]
  faults = []
  for _ in range(rng.integers(1, 5)):
    worker = str(rng.choice(workers))
    kind = "hang" if rng.uniform() < 0.3 else "kill"
    if worker == "store" and rng.uniform() < 0.3:
      kind = "restart"
    if faults and rng.uniform() < 0.33:  # the same step and layer as the previous fault
      step, layer = faults[-1].step, faults[-1].layer
    else:
      step, layer = int(rng.integers(0, max_step)), int(rng.integers(0, CFG.num_layers))
    faults.append(Fault(worker, kind, step=step, layer=layer, lost_device=-1))
  return tuple(faults)


def _check(engine_out: dict[int, tuple], fault_free: dict[int, tuple], engine: Engine):
  for rid, (tokens, err) in engine_out.items():
    want = fault_free[rid]
    if err is None:
      assert tokens == want, f"request {rid} completed with wrong tokens"
    else:
      assert err.request_id == rid and err.cause, err
      assert tokens == want[:len(tokens)], f"request {rid}: a wrong token before its error"
    indices = [ev.index for ev in engine.events if ev.request_id == rid]
    assert indices == list(range(len(tokens))), f"request {rid}: indices {indices}"
    assert engine.streams[rid].mismatches == []


@pytest.mark.parametrize("seed", range(LOCAL_SCHEDULES))
def test_a_random_fault_schedule_never_gives_a_wrong_token(seed):
  plan, devices = LOCAL_PLANS["spare" if seed % 2 else "no_spare"]
  shadows = 1 + seed % 3 // 2  # mostly one shadow per expert: experts can run out of replicas
  faults = schedule(seed, plan.num_aw, plan.num_ew)
  engine = _engine(faults, plan, devices, shadows)
  out = _serve(engine)
  _check(out, _fault_free(plan, devices, shadows), engine)


@pytest.mark.parametrize("seed", range(PROCESS_SCHEDULES))
def test_a_random_fault_schedule_on_worker_processes(seed):
  plan = CellPlan(2, 2)
  runtime = ProcessRuntime(LocalSpawner(slots=5))
  faults = schedule(1000 + seed, plan.num_aw, plan.num_ew, max_step=12)
  engine = _engine(faults, plan, 5, 1, runtime)
  out = _serve(engine)
  _check(out, _fault_free(plan, 5, 1, process=True), engine)
