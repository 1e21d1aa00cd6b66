"""Where rebuilt workers get their weights: live peers, or the user's own checkpoint (orbax or
Hugging Face), never a copy the engine writes when it needs none.

An engine given its weights in memory writes no copy when every rebuilt worker can copy them
from live peers (Tarragon, local runtime); a Hugging Face checkpoint serves as `weights_dir`
for replacements, the global restart and worker processes alike, checked against the weights
served.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest

import tarragon_jax as tj
from tarragon_jax import hf_import
from tarragon_jax.checkpoint import part_fingerprints, weights_fingerprint
from tarragon_jax.layers.params import slot_experts, without_experts
from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience.faults import parse_faults
from tarragon_jax.runtime.remote import ProcessRuntime
from tarragon_jax.runtime.spawner import LocalSpawner
from tarragon_jax.serving.engine import Engine, EngineConfig, ResilienceConfig
from tarragon_jax.weights_source import load_worker_weights
from tarragon_jax.worker.placement import place
from tarragon_jax.worker.requests import Request
from tests.hf_models import TinyMoE, build_hf_model

SPEC = TinyMoE("mixtral", vocab=64, hidden=32, heads=4, kv_heads=2, experts=4)
_rng = np.random.default_rng(22)
PROMPTS = [tuple(int(t) for t in _rng.integers(0, 64, n)) for n in (5, 9, 12, 3)]
MAX_NEW = 12


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """(directory, config, params) of a tiny saved HF Mixtral, and another model of its shape."""
  path, _ = build_hf_model(SPEC, str(tmp_path_factory.mktemp("hf")), seed=5)
  other, _ = build_hf_model(SPEC, str(tmp_path_factory.mktemp("hf_other")), seed=6)
  cfg, params = tj.load_hf_checkpoint(path, max_seq_len=64)
  return path, other, cfg, params


def _engine(hf, faults: str = "", plan=CellPlan(2, 4), runtime=None, **resilience) -> Engine:
  _, _, cfg, params = hf
  rc = ResilienceConfig(flush_interval_s=0.02, durable_chunk=16, **resilience)
  return Engine(cfg, params, EngineConfig(plan=plan, slots_per_aw=2, resilience=rc),
                faults=parse_faults(faults), runtime=runtime)


def _serve(engine: Engine) -> list[tuple[int, ...]]:
  with engine:
    ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
    engine.run()
    engine.recovery.wait_for_replacements()
    return [tuple(engine.tokens(i)) for i in ids]


@functools.cache
def _fault_free(path: str) -> list[tuple[int, ...]]:
  cfg, params = tj.load_hf_checkpoint(path, max_seq_len=64)
  return _serve(_engine((path, None, cfg, params)))


def _copies(engine: Engine) -> list[str]:
  return [d for d in os.listdir(engine._scratch) if d != "snapshots"] if os.path.exists(
      engine._scratch) else []


def test_a_local_tarragon_engine_writes_no_weights_copy_and_replaces_from_peers(hf):
  engine = _engine(hf, "kill:ew1@step=3,layer=1; kill:aw0@step=5")
  assert engine.weights_dir is None and _copies(engine) == []
  assert _serve(engine) == _fault_free(hf[0])
  joined = engine.timeline.of("replacement_joined")
  assert sorted(j["worker"] for j in joined) == ["aw0", "ew1"]
  assert {j["source"] for j in joined} == {"peer"}


def test_without_a_checkpoint_a_replacement_no_peer_can_supply_fails_its_build(hf):
  """Both EWs that hold expert 0 of layer 0 die: no peer has it, and there is no checkpoint."""
  with _engine(hf) as probe:
    holders = [int(q) // probe.state.placement.slots_per_layer
               for q in probe.state.base_table.replicas[0, 0] if q >= 0]
  a, b = holders[:2]
  engine = _engine(hf, f"kill:ew{a}@step=3,layer=1; kill:ew{b}@step=3,layer=1")
  _serve(engine)
  errors = {f["worker"]: f["error"] for f in engine.timeline.of("replacement_failed")}
  assert "no live peer holds the weights" in errors[f"ew{a}"]
  assert "ResilienceConfig.weights_dir" in errors[f"ew{a}"]


def test_a_global_restart_reloads_from_the_users_hugging_face_checkpoint(hf):
  path = hf[0]
  engine = _engine(hf, "kill:ew1@step=3", recovery="global_restart", weights_dir=path)
  assert engine.weights_dir == path and _copies(engine) == []
  assert _serve(engine) == _fault_free(path)
  (restart,) = engine.timeline.of("global_restart")
  assert restart["weight_load_s"] > 0


def test_a_global_restart_without_a_checkpoint_saves_one_and_says_so(hf, caplog):
  engine = _engine(hf, "kill:ew1@step=3", recovery="global_restart")
  assert _copies(engine) == ["weights"]
  assert any("saved a copy of the weights" in r.getMessage() for r in caplog.records)
  assert _serve(engine) == _fault_free(hf[0])


def test_a_hugging_face_checkpoint_of_another_model_is_refused(hf, tmp_path):
  path, other, cfg, _ = hf
  bigger, _ = build_hf_model(TinyMoE("mixtral", vocab=64, hidden=32, heads=4, kv_heads=2,
                                     experts=4, expert_hidden=48), str(tmp_path / "big"))
  with pytest.raises(ValueError, match="another model than the one served .*expert_hidden=48"):
    _engine(hf, weights_dir=bigger)
  # Same shapes, other weights: refused where they are loaded, and the restart fails closed.
  engine = _engine(hf, "kill:ew1@step=3", recovery="global_restart", weights_dir=other)
  with engine:
    ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
    engine.run()
    assert all("other weights than expected" in str(engine.error(i)) for i in ids)


def test_worker_processes_load_the_users_hugging_face_checkpoint(hf):
  path = hf[0]
  engine = _engine(hf, plan=CellPlan(1, 2), runtime=ProcessRuntime(LocalSpawner(4)),
                   weights_dir=path)
  assert _copies(engine) == []
  assert _serve(engine) == _fault_free(path)


def test_a_worker_reads_only_its_part_of_a_hugging_face_checkpoint(hf, monkeypatch):
  path, other, cfg, params = hf
  parts = part_fingerprints(params, cfg)
  read = []
  get = hf_import._Tensors.get
  monkeypatch.setattr(hf_import._Tensors, "get", lambda self, name: read.append(name) or get(
      self, name))
  aw = load_worker_weights(path, cfg, expect_parts=parts)
  assert not any(".experts." in name for name in read)
  _assert_same(aw, without_experts(params))
  placement = place(cfg.num_layers, cfg.num_experts, 2, shadows_per_expert=1)
  for ew in range(2):
    read.clear()
    contents = placement.contents[:, ew]
    part = load_worker_weights(path, cfg, contents, expect_parts=parts)
    _assert_same(part, slot_experts(params.layers.moe.experts, contents))
    held = {(layer, int(e)) for (layer, _), e in np.ndenumerate(contents) if e >= 0}
    assert {(int(n.split(".")[2]), int(n.split(".")[5])) for n in read} == held, read
  with pytest.raises(ValueError, match=r"other weights than expected \(expert \d of layer 0"):
    load_worker_weights(other, cfg, placement.contents[:, 0], expect_parts=parts)
  with pytest.raises(ValueError, match="the weights outside the routed experts differ"):
    load_worker_weights(other, cfg, expect_parts=parts)
  # The model's fingerprint cannot check a part: refused, not loaded unchecked.
  with pytest.raises(ValueError, match="give expect_parts"):
    load_worker_weights(path, cfg, expect=weights_fingerprint(params, cfg))


def _assert_same(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_worker_processes_refuse_a_hugging_face_checkpoint_of_other_weights(hf):
  other = hf[1]
  with pytest.raises(Exception, match="other weights than expected"):
    _engine(hf, plan=CellPlan(1, 2), runtime=ProcessRuntime(LocalSpawner(4)), weights_dir=other)
