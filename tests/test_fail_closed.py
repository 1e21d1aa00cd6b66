"""Fail closed: a request the engine cannot finish correctly ends with its own clear error, every
other request goes on with the fault-free tokens, and no call waits without a bound.

Each test is one way the engine used to serve wrong tokens silently or spin (issue 19, cases
1-4, 6, 10, 14-16); all go through the public API (`submit`, streams, `generate`, `error`).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil

import jax
import numpy as np
import pytest

import tarragon_jax as tj
from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience.detector import DetectionConfig
from tarragon_jax.resilience.faults import parse_faults
from tarragon_jax.serving.engine import Engine, EngineConfig, RequestsFailed, ResilienceConfig
from tarragon_jax.worker.requests import Request

CFG = tj.ModelConfig(family="mixtral", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, num_experts=8, top_k=2, expert_hidden=64,
                     max_seq_len=64)
_rng = np.random.default_rng(19)
PROMPTS = [tuple(int(t) for t in _rng.integers(0, 128, n)) for n in (5, 9, 12, 3, 7, 11)]
MAX_NEW = 16


@functools.cache
def _params(seed: int = 3):
  return tj.init_params(CFG, jax.random.key(seed))


def _engine(faults: str = "", plan=CellPlan(3, 4), devices=None, params=None, shadows=1,
            on_token=None, **resilience) -> Engine:
  rc = ResilienceConfig(flush_interval_s=0.02, durable_chunk=16, **resilience)
  ec = EngineConfig(plan=plan, slots_per_aw=2, shadows_per_expert=shadows, resilience=rc)
  return Engine(CFG, params or _params(), ec, devices=devices, faults=parse_faults(faults),
                on_token=on_token)


def _serve(engine: Engine) -> list[int]:
  ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
  engine.run()
  return ids


@functools.cache
def _fault_free() -> tuple[tuple[int, ...], ...]:
  with _engine() as engine:
    ids = _serve(engine)
    return tuple(tuple(engine.tokens(i)) for i in ids)


def _check_each_request(engine: Engine, ids: list[int], cause: str) -> int:
  """Every request completed with the fault-free tokens, or failed with `cause` after a prefix
  of them; each index delivered once. Returns how many failed."""
  failed = 0
  for rid, want in zip(ids, _fault_free()):
    tokens, err = engine.tokens(rid), engine.error(rid)
    indices = [ev.index for ev in engine.events if ev.request_id == rid]
    assert indices == list(range(len(tokens))), (rid, indices)
    assert engine.streams[rid].mismatches == []
    if err is None:
      assert tuple(tokens) == want, f"request {rid} completed with wrong tokens"
    else:
      failed += 1
      assert err.request_id == rid and cause in str(err), err
      assert tuple(tokens) == want[:len(tokens)], f"request {rid}: wrong tokens before its error"
  assert engine.idle
  return failed


def _ews_holding_one_expert(engine: Engine) -> tuple[int, int]:
  """Two EWs that hold every replica of some expert (with one shadow per expert)."""
  S = engine.state.placement.slots_per_layer
  for row in engine.state.placement.replicas.reshape(-1, engine.state.placement.replicas.shape[-1]):
    ews = sorted({int(p) // S for p in row if p >= 0})
    if len(ews) == 2:
      return ews[0], ews[1]
  raise AssertionError("every expert has replicas on three EWs")


@pytest.mark.parametrize("spare", [False, True])
def test_an_expert_with_no_replica_left_fails_its_requests_unless_a_replacement_is_coming(
    spare, tmp_path):
  """Case 1: zero spares, two EWs killed that hold both replicas of an expert. The requests
  routed there end with 'no live replica' (run() used to raise once, then serve them with
  zeros); with a spare (and a checkpoint: no live peer holds the expert any more) they wait
  for the replacement and complete."""
  plan = CellPlan(3, 4) if spare else CellPlan(4, 4)
  with _engine(plan=plan) as probe_engine:
    m1, m2 = _ews_holding_one_expert(probe_engine)
  weights = None
  if spare:
    weights = str(tmp_path / "weights")
    tj.save_checkpoint(weights, _params(), CFG)
  engine = _engine(f"kill:ew{m1}@step=3,layer=1; kill:ew{m2}@step=3,layer=1", plan=plan,
                   weights_dir=weights)
  with engine:
    ids = _serve(engine)
    engine.run()  # again: nothing more happens, nothing raises
    failed = _check_each_request(engine, ids, "no live replica")
  if spare:
    assert failed == 0
  else:
    assert failed >= 1
    assert engine.summary()["failed"] == failed
    assert engine.timeline.of("experts_unreachable")[0]["replacements"] == 0


def test_a_routing_table_that_routes_to_a_failed_ew_is_refused():
  """Case 2: a table that sends an expert to an EW already declared failed."""
  with _engine("kill:ew1@step=2", replace_failed=False) as engine:
    ids = _serve(engine)
    assert _check_each_request(engine, ids, "-") == 0
    installed = engine.state.table
    with pytest.raises(ValueError, match="EW 1, which was declared failed"):
      engine.set_routing_table(engine.state.base_table)
    assert engine.state.table is installed


def test_an_on_token_callback_that_raises_leaves_the_engine_consistent():
  """Case 3: a callback raises once; the caller runs again; every request completes with the
  fault-free tokens and the callback sees every event once."""
  seen = []

  def on_token(event):
    seen.append((event.request_id, event.index))
    if len(seen) == 10:
      raise KeyError("client bug")

  with _engine(on_token=on_token) as engine:
    ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
    with pytest.raises(KeyError, match="client bug"):
      engine.run()
    engine.run()
    assert _check_each_request(engine, ids, "-") == 0
  assert sorted(seen) == sorted((ev.request_id, ev.index) for ev in engine.events)
  assert len(seen) == len(set(seen)) == len(PROMPTS) * MAX_NEW


def test_another_models_weights_are_refused_where_they_enter(tmp_path):
  """Case 4: a weights_dir with another model's weights (same shapes, or other shapes)."""
  other = tj.save_checkpoint(str(tmp_path / "other"), _params(4), CFG)
  with pytest.raises(ValueError, match="other weights than expected"):
    _engine(weights_dir=str(tmp_path / "other"))
  small = dataclasses.replace(CFG, expert_hidden=32)
  tj.save_checkpoint(str(tmp_path / "small"), tj.init_params(small, jax.random.key(3)), small)
  with pytest.raises(ValueError, match="other weights than expected"):
    _engine(weights_dir=str(tmp_path / "small"))
  del other


def test_a_replacement_loading_other_weights_fails_its_build_not_the_tokens(tmp_path):
  """Case 4, at load time: the checkpoint is swapped after the engine started. Both EWs that
  hold an expert die, so its replacement must load it from the checkpoint: the fingerprint
  refuses it, and the requests routed to that expert fail instead of being served by another
  model's weights."""
  weights = str(tmp_path / "weights")
  tj.save_checkpoint(weights, _params(), CFG)
  with _engine() as probe_engine:
    m1, m2 = _ews_holding_one_expert(probe_engine)
  engine = _engine(f"kill:ew{m1}@step=3,layer=1; kill:ew{m2}@step=3,layer=1",
                   weights_dir=weights)
  shutil.rmtree(weights)
  tj.save_checkpoint(weights, _params(4), CFG)
  with engine:
    ids = _serve(engine)
    assert _check_each_request(engine, ids, "no live replica") >= 1
  (failed,) = engine.timeline.of("replacement_failed")
  assert failed["worker"] == f"ew{m1}" and "other weights than expected" in failed["error"]


def test_a_global_restart_from_other_weights_fails_every_request(tmp_path):
  """Case 4 for the baseline: its restart reloads every weight from the checkpoint."""
  weights = str(tmp_path / "weights")
  tj.save_checkpoint(weights, _params(), CFG)
  engine = _engine("kill:ew1@step=3", weights_dir=weights, recovery="global_restart",
                   shadows=0)
  shutil.rmtree(weights)
  tj.save_checkpoint(weights, _params(4), CFG)
  with engine:
    ids = _serve(engine)
    assert _check_each_request(engine, ids, "other weights than expected") == len(PROMPTS)


def test_a_non_finite_row_fails_its_own_request():
  """Case 6: a row whose activations are not finite (here: the embedding of one token id is
  NaN) used to get greedy token 0 (argmax over all-NaN logits) without an error. Only the
  request that feeds that token fails; `generate` says which."""
  used = {t for p in PROMPTS for t in p} | {t for out in _fault_free() for t in out}
  poison = max(set(range(CFG.vocab_size)) - used)
  params = dataclasses.replace(_params(), embed=_params().embed.at[poison].set(float("nan")))
  prompts = [PROMPTS[0][:-1] + (poison,)] + PROMPTS[1:]
  with _engine(params=params) as engine, pytest.raises(RequestsFailed) as info:
    engine.generate(prompts, MAX_NEW)
  assert list(info.value.errors) == [0]
  assert "not finite" in str(info.value.errors[0]) and info.value.outputs[0] == []
  assert [tuple(t) for t in info.value.outputs[1:]] == list(_fault_free()[1:])


def test_every_aw_dead_and_no_spare_fails_every_request_at_once():
  """Case 10: used to spin ~95 s, then 'engine not idle after 1000000 iterations'."""
  devices = jax.devices()[:6]  # 2 AWs + 4 EWs, no spare
  with _engine("kill:aw0@step=3; kill:aw1@step=3", plan=CellPlan(2, 4),
               devices=devices) as engine:
    ids = _serve(engine)
    assert _check_each_request(engine, ids, "no attention worker is alive") == len(PROMPTS)
    rid = engine.submit(Request(PROMPTS[0], 4))
    engine.run()
    assert "no attention worker is alive" in str(engine.error(rid))


@pytest.mark.parametrize("spec, match", [
    ("kill:aw9@step=1", "aw9"),
    ("kill:ew4@step=1", "ew4"),
    ("kill:ew1@step=1,layer=2", "layer"),
    ("kill:aw0@step=1,lost_device=1", "lost_device"),
])
def test_a_schedule_is_checked_against_the_engine_when_armed(spec, match):
  """Case 14: a bad fault used to surface only when it fired, mid-run."""
  with pytest.raises(ValueError, match=match):
    _engine(spec)
  with _engine() as engine:
    with pytest.raises(ValueError, match=match):
      engine.arm_faults(parse_faults(spec))
    assert engine.injector.pending == []


def test_a_restore_whose_target_dies_counts_no_negative_recomputation():
  """Case 15: aw0's requests are restored onto the idle aw2, which died unnoticed (a long
  probe interval keeps the idle probe from finding it first)."""
  slow_probe = DetectionConfig(probe_interval_s=5.0, deadline_s=60.0)
  with _engine("kill:aw0@step=4,layer=1; kill:aw2@step=4,layer=1",
               detection=slow_probe) as engine:
    ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS[:2]]  # on aw0 and aw1
    engine.run()
    for rid, want in zip(ids, _fault_free()):
      assert tuple(engine.tokens(rid)) == want and engine.error(rid) is None
  restores = engine.recovery.restores
  assert restores and all(r["recomputed_tokens"] >= 0 for r in restores), restores
  assert engine.summary()["recomputed_tokens"] >= 0
  assert {ev["aw"] for ev in engine.timeline.of("aw_failed")} == {0, 2}


def test_a_closed_engine_refuses_work():
  """Case 16: generate() after close() served silently and started a new store."""
  engine = _engine()
  engine.close()
  for call in (lambda: engine.generate(PROMPTS[:1], 4),
               lambda: engine.submit(Request(PROMPTS[0], 4)), engine.step):
    with pytest.raises(RuntimeError, match="closed"):
      call()
  engine.close()  # again: nothing
