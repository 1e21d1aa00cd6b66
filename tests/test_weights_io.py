"""Weights in and out: orbax checkpoints, Hugging Face import errors, ModelConfig validation."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tarragon_jax as tj
from tarragon_jax import hf_import
from tests.hf_models import TinyMoE, build_hf_model, random_params

# Qwen2-MoE with a shared expert and q/k/v biases: every optional weight is present.
CONFIG = tj.ModelConfig(family="qwen2_moe", vocab_size=48, hidden_size=16, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=4, num_experts=4, top_k=2,
                        expert_hidden=8, shared_expert_hidden=8, attention_bias=True,
                        norm_topk_prob=False, max_seq_len=32)


def _assert_same_params(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                         strict=True):
    assert a.dtype == b.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Two steps in one directory: step 0 in f32, step 5 (the latest) in bf16."""
  directory = str(tmp_path_factory.mktemp("ckpt"))
  params0 = random_params(CONFIG, seed=0)
  cfg5 = CONFIG.replace(dtype="bfloat16", expert_kernel="loop")
  params5 = random_params(cfg5, seed=5)
  path0 = tj.save_checkpoint(directory, params0, CONFIG, step=0)
  path5 = tj.save_checkpoint(directory, params5, cfg5, step=5, metadata={"note": "bf16"})
  assert (path0, path5) == (os.path.join(directory, "0"), os.path.join(directory, "5"))
  return directory, {0: (CONFIG, params0), 5: (cfg5, params5)}


@pytest.mark.parametrize("step", [0, 5, None])
def test_orbax_round_trip_is_bit_identical(saved, step):
  directory, steps = saved
  cfg, params = tj.load_checkpoint(directory, step=step)
  want_cfg, want_params = steps[5 if step is None else step]
  assert cfg == want_cfg
  _assert_same_params(params, want_params)
  for leaf in jax.tree.leaves(params):
    assert leaf.devices() == {jax.devices()[0]}


def test_missing_step_is_named(saved):
  directory, _ = saved
  with pytest.raises(FileNotFoundError, match=r"no checkpoint step 3; steps: \[0, 5\]"):
    tj.load_checkpoint(directory, step=3)


def test_restore_onto_a_given_device(saved):
  directory, steps = saved
  device = jax.sharding.SingleDeviceSharding(jax.devices()[3])
  _, params = tj.load_checkpoint(directory, step=0, shardings=device)
  for leaf in jax.tree.leaves(params):
    assert leaf.sharding == device
  _assert_same_params(params, steps[0][1])


def test_restore_onto_expert_sharded_mesh(saved):
  """A ModelParams-shaped tree of shardings built from logical axes: experts split over 4."""
  directory, steps = saved
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("ep",))
  shardings = jax.tree.map(
      lambda axes: jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(*["ep" if a == "experts" else None for a in axes])),
      tj.logical_axes(CONFIG), is_leaf=lambda x: isinstance(x, tuple))
  _, params = tj.load_checkpoint(directory, step=0, shardings=shardings)
  w_up = params.layers.moe.experts.w_up  # [L, E, D, F], E = 4 over 4 devices
  assert w_up.sharding == shardings.layers.moe.experts.w_up
  assert {s.data.shape for s in w_up.addressable_shards} == {(2, 1, 16, 8)}
  assert params.embed.sharding.is_fully_replicated
  _assert_same_params(params, steps[0][1])


# Hugging Face import errors. Each test edits a copy of one tiny saved Mixtral.

SRC_SPEC = TinyMoE("mixtral", vocab=64, hidden=32, heads=4, kv_heads=2, experts=4)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path, _ = build_hf_model(SRC_SPEC, str(tmp_path_factory.mktemp("hf_src")), seed=3)
  return path


@pytest.fixture
def hf_copy(hf_dir, tmp_path):
  path = str(tmp_path / "copy")
  shutil.copytree(hf_dir, path)
  return path


def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  for k, v in changes.items():
    if v is None:
      hf.pop(k)
    else:
      hf[k] = v
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)


def _edit_tensors(path, edit):
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def test_hf_import_loads_the_unedited_copy(hf_copy):
  cfg, params = tj.load_hf_checkpoint(hf_copy, expert_kernel="ragged")
  assert (cfg.family, cfg.num_layers, cfg.num_experts, cfg.expert_kernel) == (
      "mixtral", 2, 4, "ragged")
  assert params.layers.moe.experts.w_gate.shape == (2, 4, 32, 24)
  assert issubclass(tj.CheckpointError, ValueError)


def test_hf_import_in_bf16_straight_onto_an_expert_sharded_mesh(hf_dir, monkeypatch):
  """bf16 onto a mesh: each device's shard is read from the files and cast there."""
  want_cfg, want = tj.load_hf_checkpoint(hf_dir)  # f32 on one device: the reference
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("ep",))
  shardings = jax.tree.map(
      lambda axes: jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(*["ep" if a == "experts" else None for a in axes])),
      tj.logical_axes(want_cfg), is_leaf=lambda x: isinstance(x, tuple))
  reads = collections.Counter()
  get = hf_import._Tensors.get
  monkeypatch.setattr(hf_import._Tensors, "get",
                      lambda self, name: reads.update([name]) or get(self, name))
  cfg, params = tj.load_hf_checkpoint(hf_dir, dtype="bfloat16", shardings=shardings)
  assert cfg == want_cfg.replace(dtype="bfloat16")
  # An expert's tensors are read by the one device that holds it; a replicated weight's once,
  # not once per device. (A tensor split inside, the router's [D, E], is read by each part.)
  experts = [n for n in reads if ".experts." in n]
  assert len(experts) == 2 * 4 * 3 and {reads[n] for n in experts} == {1}
  assert reads["model.embed_tokens.weight"] == reads["model.layers.1.self_attn.q_proj.weight"] == 1
  w_gate = params.layers.moe.experts.w_gate  # [L, E, D, F], E = 4 over 4 devices
  assert w_gate.sharding == shardings.layers.moe.experts.w_gate
  assert {s.data.shape for s in w_gate.addressable_shards} == {(2, 1, 32, 24)}
  assert params.embed.sharding.is_fully_replicated and len(params.embed.devices()) == 4
  for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
    assert got.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref.astype(got.dtype)))


def test_unsupported_model_type_names_it_and_the_supported_ones(hf_copy):
  _edit_config(hf_copy, model_type="llama")
  with pytest.raises(tj.CheckpointError, match="model_type='llama'") as e:
    tj.load_hf_checkpoint(hf_copy)
  for family in ("mixtral", "qwen3_moe", "qwen2_moe"):
    assert family in str(e.value)


def test_missing_config_json(hf_copy):
  os.remove(os.path.join(hf_copy, "config.json"))
  with pytest.raises(tj.CheckpointError, match="no config.json"):
    tj.load_hf_checkpoint(hf_copy)


def test_invalid_config_json(hf_copy):
  with open(os.path.join(hf_copy, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(tj.CheckpointError, match="is not valid JSON"):
    tj.load_hf_checkpoint(hf_copy)


def test_config_json_missing_field_is_named(hf_copy):
  _edit_config(hf_copy, num_attention_heads=None)
  with pytest.raises(tj.CheckpointError, match="lacks the field 'num_attention_heads'"):
    tj.load_hf_checkpoint(hf_copy)


def test_unsupported_activation_is_named(hf_copy):
  _edit_config(hf_copy, hidden_act="gelu")
  with pytest.raises(tj.CheckpointError, match="hidden_act='gelu'"):
    tj.load_hf_checkpoint(hf_copy)


def test_missing_safetensors(hf_copy):
  os.remove(os.path.join(hf_copy, "model.safetensors"))
  with pytest.raises(tj.CheckpointError, match="no model.safetensors"):
    tj.load_hf_checkpoint(hf_copy)


def test_missing_tensor_is_named(hf_copy):
  name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
  _edit_tensors(hf_copy, lambda t: t.pop(name))
  with pytest.raises(tj.CheckpointError, match=re.escape(repr(name))):
    tj.load_hf_checkpoint(hf_copy)


def test_wrong_shape_in_every_layer_names_the_weight_and_shapes(hf_copy):
  def edit(t):
    for layer in range(SRC_SPEC.layers):
      t[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = np.zeros((5, 32), np.float32)

  _edit_tensors(hf_copy, edit)
  message = "router has shape (2, 32, 5); config.json implies (2, 32, 4)"
  with pytest.raises(tj.CheckpointError, match=re.escape(message)):
    tj.load_hf_checkpoint(hf_copy)


def test_wrong_vocab_names_the_weight(hf_copy):
  _edit_tensors(hf_copy, lambda t: t.__setitem__("model.embed_tokens.weight",
                                                 np.zeros((63, 32), np.float32)))
  with pytest.raises(tj.CheckpointError, match=re.escape("embed has shape (63, 32)")):
    tj.load_hf_checkpoint(hf_copy)


@pytest.mark.parametrize("name,shape", [
    ("model.layers.0.self_attn.k_proj.weight", (8, 32)),
    ("model.layers.1.block_sparse_moe.experts.2.w1.weight", (25, 32)),
])
def test_wrong_shape_in_one_layer_names_the_tensor(hf_copy, name, shape):
  _edit_tensors(hf_copy, lambda t: t.__setitem__(name, np.zeros(shape, np.float32)))
  with pytest.raises(tj.CheckpointError, match=re.escape(name)):
    tj.load_hf_checkpoint(hf_copy)


# ModelConfig validation: the message says what is wrong.

@pytest.mark.parametrize("changes,message", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads=6 must be a multiple of num_kv_heads=4"),
    (dict(num_experts=4, top_k=5), "top_k=5 must be <= num_experts=4"),
    (dict(family="llama"), "family='llama'; valid families are"),
    (dict(hidden_size=0), "hidden_size=0 must be a positive int"),
    (dict(head_dim=8.0), "head_dim=8.0 must be a positive int"),
    (dict(dtype="float16"), "dtype='float16'; valid dtypes are"),
    (dict(expert_kernel="dense"), "expert_kernel='dense'; valid kernels are"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
    (dict(sliding_window=0), "sliding_window=0 must be None or > 0"),
    (dict(shared_expert_hidden=-1), "shared_expert_hidden=-1 must be >= 0"),
])
def test_model_config_rejects_with_a_message(changes, message):
  with pytest.raises(ValueError, match=re.escape(f"ModelConfig: {message}")):
    tj.ModelConfig(**changes)


def test_model_config_dict_round_trip_and_unknown_fields():
  assert tj.ModelConfig.from_dict(CONFIG.to_dict()) == CONFIG
  with pytest.raises(ValueError, match=r"unknown fields \['num_expert'\]"):
    tj.ModelConfig.from_dict({**CONFIG.to_dict(), "num_expert": 4})
