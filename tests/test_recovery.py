"""Recovery acceptance: an EW failure costs requests at most the step it hit, recomputation
after an AW failure, no compilation on the failover path, the durable snapshot tier, and
multi-device cells."""

from __future__ import annotations

import functools
import json
import time

import jax
import numpy as np
import pytest

import tarragon_jax as tj
from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience.faults import parse_faults
from tarragon_jax.resilience.kv_archive import read_archive
from tarragon_jax.serving.engine import Engine, EngineConfig, ResilienceConfig
from tarragon_jax.serving.metrics import compile_count
from tarragon_jax.worker.requests import Request

# Four layers: replaying one layer at an EW failure costs a quarter of a step, as it would be a
# small fraction of a step in a deep model.
CFG = tj.ModelConfig(family="qwen3_moe", qk_norm=True, vocab_size=128, hidden_size=32,
                     num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=8,
                     top_k=2, expert_hidden=64, max_seq_len=64)
_rng = np.random.default_rng(11)
PROMPTS = [tuple(int(t) for t in _rng.integers(0, 128, n)) for n in (6, 10, 3, 13, 8, 5)]
MAX_NEW = 30


@functools.cache
def _params():
  return tj.init_params(CFG, jax.random.key(5))


def _engine(faults="", plan=CellPlan(3, 4), slots=4, **resilience) -> Engine:
  rc = ResilienceConfig(flush_interval_s=resilience.pop("flush_interval_s", 0.02), **resilience)
  return Engine(CFG, _params(), EngineConfig(plan=plan, slots_per_aw=slots, resilience=rc),
                faults=parse_faults(faults))


def _serve(engine: Engine, warm: bool = False) -> list[list[int]]:
  if warm:
    engine.warm_up([1, 16])
  ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
  engine.run()
  engine.close()
  assert engine.injector.pending == []
  return [engine.tokens(i) for i in ids]


@functools.cache
def _fault_free(plan=CellPlan(3, 4)) -> list[tuple[int, ...]]:
  return [tuple(t) for t in _serve(_engine(plan=plan))]


@pytest.mark.parametrize("fault", ["kill:ew1@step=12,layer=2", "hang:ew2@step=12,layer=1"])
def test_at_an_ew_failure_every_request_still_gets_its_token_in_the_step_it_hit(fault):
  """No request waits for more than the step the fault hit: the EW is declared, the layer
  replayed to shadows and every request's token delivered inside that one step (as ordering
  facts; the stall in seconds is measured by `experiments.failover`)."""
  engine = _engine(fault)
  engine.warm_up([1, 16])
  ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
  got: dict[int, set[int]] = {}  # iteration -> requests that received a token in it
  while not engine.idle:
    before, iteration = len(engine.events), engine.iteration
    engine.step()
    got[iteration] = {ev.request_id for ev in engine.events[before:]}
  engine.close()
  assert [tuple(engine.tokens(i)) for i in ids] == _fault_free()
  (failed,) = engine.timeline.of("ew_failed")
  step = failed["step"]
  assert step == engine.timeline.of("fault")[0]["step"] == 12  # declared in the step it hit
  assert [ev["layer"] for ev in engine.timeline.of("replay")] == [failed["layer"]]
  assert got[step] == set(ids)  # every request decoding then got its token in that step
  assert engine.timeline.of("replacement_started")[0]["t"] > engine.timeline.of("replay")[0]["t"]


def test_an_aw_failure_recomputes_at_most_the_uncommitted_tail():
  on = _engine("kill:aw1@step=14,layer=2")
  assert [tuple(t) for t in _serve(on)] == _fault_free()
  off = _engine("kill:aw1@step=14,layer=2", snapshots=False)
  assert [tuple(t) for t in _serve(off)] == _fault_free()
  r_on, r_off = on.recovery.restores, off.recovery.restores
  assert {r["mode"] for r in r_on} == {"restore"} and {r["mode"] for r in r_off} == {"reprefill"}
  assert [r["request"] for r in r_on] == [r["request"] for r in r_off]
  for a, b in zip(r_on, r_off):
    assert a["had"] == b["had"] > len(PROMPTS[a["request"]])  # failed well into decode
    assert a["recomputed_tokens"] == a["had"] - a["restored"] <= a["uncommitted_tail"]
    assert b["recomputed_tokens"] == b["had"]  # without snapshots: the whole request
    assert a["bytes"] > 0 and b["bytes"] == 0


def test_a_replacement_starts_after_the_restored_requests_have_been_served():
  engine = _engine("kill:aw1@step=14,layer=2")
  assert [tuple(t) for t in _serve(engine)] == _fault_free()
  started = engine.timeline.of("replacement_started")
  assert [ev["worker"] for ev in started] == ["aw1"]
  restored = {r["request"] for r in engine.recovery.restores}
  fault_t = engine.timeline.of("fault")[0]["t"]
  first_after = {r: min(ev.time for ev in engine.events
                        if ev.request_id == r and ev.time > fault_t) for r in restored}
  assert restored and max(first_after.values()) < started[0]["t"]  # service first
  assert engine.timeline.of("replacement_joined")  # then capacity


@pytest.mark.parametrize("field,value,match", [
    ("recovery", "bogus", "recovery='bogus' is not a built-in policy; use one of"),
    ("flush_interval_s", 0.0, "flush_interval_s=0.0 must be > 0"),
    ("durable_chunk", 0, "durable_chunk=0 must be >= 1")])
def test_a_bad_resilience_config_names_the_value(field, value, match):
  with pytest.raises(ValueError, match=match):
    ResilienceConfig(**{field: value})


def test_failover_and_restore_compile_nothing_after_warm_up():
  engine = _engine("kill:ew0@step=6,layer=1; kill:aw2@step=9,layer=3", replace_failed=False)
  engine.warm_up([1, 16])
  ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
  while engine.iteration < 4:  # prefill + a few decode steps
    engine.step()
  before = compile_count()
  engine.run()
  engine.close()
  assert compile_count() == before
  assert [tuple(engine.tokens(i)) for i in ids] == _fault_free()
  assert engine.timeline.of("replay") and engine.recovery.restores


def test_the_durable_tier_holds_what_the_aw_cache_holds(tmp_path):
  engine = _engine(store_dir=str(tmp_path), durable_chunk=16)
  ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
  while engine.iteration < 22:
    engine.step()
  store = engine.state.store
  chunks = {r: engine.requests[r].cached // 16 * 16 for r in ids}
  assert min(chunks.values()) >= 16
  deadline = time.perf_counter() + 120  # a bound on the wait, not a speed claim
  while any(store.archive.durable.get(r) != chunks[r] for r in ids):
    assert time.perf_counter() < deadline, (store.archive.durable, chunks)
    time.sleep(0.01)
  commits = json.loads((tmp_path / "gen1" / "commits.json").read_text())
  for r in ids:
    s = engine.requests[r]
    assert commits[str(r)]["n"] == chunks[r]
    k, v = read_archive(store.archive.directory, r)  # tensorstore's zarr3 reader
    k_aw, v_aw = engine.state.aws[s.aw].cache.read(s.slot)
    np.testing.assert_array_equal(k, k_aw[:, :chunks[r]])
    np.testing.assert_array_equal(v, v_aw[:, :chunks[r]])
  engine.run()
  engine.close()


@pytest.mark.parametrize("fault", ["kill:ew1@step=5,lost_device=0",
                                   "kill:aw0@step=5,lost_device=1"])
def test_a_multi_device_cell_fails_as_a_unit_and_is_rebuilt_on_the_survivors(fault):
  plan = CellPlan(2, 2, devices_per_aw=2, devices_per_ew=2)  # all 8 devices, no spare
  engine = _engine(fault, plan=plan, slots=3)
  ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
  engine.run()
  assert [tuple(engine.tokens(i)) for i in ids] == _fault_free(plan)
  engine.recovery.wait_for_replacements()
  ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]  # again, with the replacement
  engine.run()
  engine.close()
  assert [tuple(engine.tokens(i)) for i in ids] == _fault_free(plan)
  (joined,) = engine.timeline.of("replacement_joined")
  assert len(joined["devices"]) == 1  # the cell's surviving device, re-sharded onto
  assert len(engine.state.lost_devices) == 1
  worker = fault.split(":")[1].split("@")[0]
  assert joined["worker"] == worker


def test_the_timeline_is_written_as_jsonl(tmp_path):
  engine = _engine("kill:ew3@step=3; kill:aw1@step=6")
  _serve(engine)
  path = tmp_path / "timeline.jsonl"
  engine.timeline.write_jsonl(str(path), t0=engine.t0)
  events = [json.loads(line) for line in path.read_text().splitlines()]
  names = [e["event"] for e in events]
  for name in ("fault", "declared_failed", "ew_failed", "table", "replay", "aw_failed",
               "restore", "replacement_started"):
    assert name in names
  assert all(e["t"] >= 0 for e in events)


def test_a_bf16_engine_restores_and_fails_over_with_its_fault_free_tokens():
  """bf16 end to end: weights, activations, the KV cache, its snapshots (host tier and the
  tensorstore tier, read back with tensorstore's reader) and the restore of a killed AW's
  requests."""
  cfg = CFG.replace(dtype="bfloat16")
  params = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), _params())

  def serve(faults):
    rc = ResilienceConfig(flush_interval_s=0.02, durable_chunk=16)
    archived = None
    with Engine(cfg, params, EngineConfig(plan=CellPlan(3, 4), slots_per_aw=4, resilience=rc),
                faults=parse_faults(faults)) as engine:
      ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
      while archived is None and engine.step():
        durable = engine.state.store.archive.durable  # (a finished request leaves it)
        if durable:
          archived = read_archive(engine.state.store.archive.directory, next(iter(durable)))
      engine.run()
      return [engine.tokens(i) for i in ids], engine.timeline.of("restore"), archived

  clean, _, _ = serve("")
  faulty, restored, archived = serve("kill:aw1@step=12; kill:ew1@step=16,layer=2")
  assert faulty == clean
  assert restored and archived is not None and archived[0].dtype == jax.numpy.bfloat16


def test_a_global_restart_recompiles_the_engine_but_not_the_users_functions():
  """The baseline drops every executable its workers compiled, and nothing else of the
  process's: a user's jitted function stays compiled."""
  users = jax.jit(lambda x: x * 2 + 1)
  users(np.float32(1.0))
  engine = _engine("kill:ew1@step=4", recovery="global_restart")
  assert [tuple(t) for t in _serve(engine)] == _fault_free()
  (restart,) = engine.timeline.of("global_restart")
  assert restart["compile_s"] > 0
  assert users._cache_size() == 1


def test_clear_compiled_empties_every_worker_executable_and_no_other():
  from tarragon_jax.worker import datapath, workers

  users = jax.jit(lambda x: x + 1)
  users(np.float32(1.0))
  params = _params()
  workers.clear_compiled()  # (what earlier tests compiled)
  datapath.aw_embed(params, np.zeros((1, 2), np.int32))
  assert datapath.aw_embed._cache_size() == 1
  workers.clear_compiled()
  jitted = [fn for fn in vars(datapath).values() if type(fn) is type(users)]
  assert datapath.aw_embed in jitted and datapath.aw_finish in jitted
  assert all(fn._cache_size() == 0 for fn in jitted if fn is not datapath.sample)
  assert users._cache_size() == 1
