"""The process runtime: every AW and EW its own OS process; faults are SIGKILL and SIGSTOP.

Small on purpose (each worker process starts its own JAX runtime): 2 AWs + 2 EWs + spares.
Every request completes with the tokens of the local runtime, each index delivered once.
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from test_serve_launcher import _run

import tarragon_jax as tj
from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience.faults import parse_faults
from tarragon_jax.runtime.remote import ProcessRuntime
from tarragon_jax.runtime.spawner import LocalSpawner
from tarragon_jax.serving.engine import Engine, EngineConfig, ResilienceConfig
from tarragon_jax.worker.requests import Request

CFG = tj.ModelConfig(family="mixtral", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, num_experts=8, top_k=2, expert_hidden=64,
                     max_seq_len=64)
PLAN = CellPlan(2, 2)
_rng = np.random.default_rng(21)
PROMPTS = [tuple(int(t) for t in _rng.integers(0, 128, n)) for n in (5, 9, 12, 3)]
MAX_NEW = 24


@functools.cache
def _params():
  return tj.init_params(CFG, jax.random.key(8))


def _serve(runtime=None, faults: str = "", **resilience) -> Engine:
  rc = ResilienceConfig(**resilience)
  engine = Engine(CFG, _params(), EngineConfig(plan=PLAN, slots_per_aw=2, resilience=rc),
                  faults=parse_faults(faults), runtime=runtime)
  return _run_to_end(engine)


def _run_to_end(engine: Engine) -> Engine:
  """Serves `PROMPTS` to the end; the tokens are left in `engine.outputs`."""
  ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
  try:
    engine.run()
    engine.recovery.wait_for_replacements()
  finally:
    engine.close()
  engine.outputs = [tuple(engine.tokens(i)) for i in ids]
  return engine


@functools.cache
def _local_tokens():
  return _serve().outputs


def _check(engine: Engine):
  assert engine.injector.pending == []
  assert engine.outputs == _local_tokens()
  for rid, stream in engine.streams.items():
    assert stream.mismatches == []
    assert [ev.index for ev in engine.events if ev.request_id == rid] == list(range(MAX_NEW))


def test_worker_processes_give_the_local_runtimes_tokens():
  engine = _serve(ProcessRuntime(LocalSpawner(5)))
  _check(engine)
  children = [w.child for w in engine.runtime.workers] + [s.child for s in engine.runtime.stores]
  assert len(engine.runtime.stores) == 1 and not any(c.alive() for c in children)  # all exited


@pytest.mark.parametrize("store_fault", ["kill", "hang"])
def test_a_failed_store_process_is_replaced_and_later_restores_use_the_new_one(store_fault):
  # A hang is declared by probes (time, not steps), and the new store's base snapshot goes out
  # at the step after that: the AW dies well after it, even on a loaded host (an AW that died
  # before the base left its requests nowhere but in their prompts: re-prefill, rightly).
  engine = _serve(ProcessRuntime(LocalSpawner(5)),
                  f"{store_fault}:store@step=3; kill:aw0@step=14,layer=1")
  _check(engine)
  declared = [ev["worker"] for ev in engine.timeline.of("declared_failed")]
  assert declared == ["store", "aw0"]
  assert len(engine.runtime.stores) == 2  # the standby process took over
  restores = [r for r in engine.recovery.restores if r["had"] > 0]
  assert restores and all(r["mode"] == "restore" and r["restored"] > 0 for r in restores)


@pytest.mark.parametrize("faults, transport", [
    ("kill:ew1@step=4,layer=1; hang:aw0@step=8", "zmq"),  # SIGKILL an EW, later SIGSTOP an AW
    ("kill:aw1@step=5,layer=0; kill:ew0@step=5,layer=0", "zmq"),  # two at once
    ("kill:ew1@step=4,layer=1; hang:aw0@step=8", "transfer"),  # the same on jax's pulls
])
def test_signals_to_worker_processes_are_survived(faults, transport):
  engine = _serve(ProcessRuntime(LocalSpawner(6), transport=transport), faults)
  _check(engine)
  declared = {ev["worker"]: ev["how"] for ev in engine.timeline.of("declared_failed")}
  # A killed process is declared at once (its connection dropped, its port refuses); a stopped
  # one only after its probes go unanswered (its kernel still accepts connections).
  assert declared == {f.worker: "connection closed" if f.kind == "kill" else "probe unanswered"
                      for f in parse_faults(faults)}
  joined = {ev["worker"] for ev in engine.timeline.of("replacement_joined")}
  assert joined == set(declared)  # each replaced by a new process on a spare slot


def test_global_restart_restarts_every_worker_process():
  engine = _serve(ProcessRuntime(LocalSpawner(5)), "kill:ew1@step=6", recovery="global_restart",
                  snapshots=False)
  _check(engine)
  (restart,) = engine.recovery.restarts
  assert restart["rebuild_s"] > 0 and restart["compile_s"] > 0
  assert len(engine.runtime.workers) == 2 * 4  # four processes, then four new ones


def test_soak_smoke_kills_and_stops_workers_and_loses_no_token(tmp_path):
  out = _run("experiments.soak", "--config=configs/soak_tiny.py", f"--workdir={tmp_path}",
             "--config.duration_s=12", "--config.fault_every_s=5", "--config.rate=3",
             "--config.output_len=24", "--config.check_requests=8")
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["completed"] == summary["requests"] > 0, out
  assert summary["faults"] == summary["declared"] == 2
  assert summary["tokens_lost"] == 0 and summary["mismatches"] == 0
  assert summary["sample_matches_reference"] is True
