"""A worker's part of an orbax checkpoint: an AW reads every weight but the routed experts, an
EW its expert slots and no other expert's chunk; both equal the same part cut from the whole
model, in f32 and bf16, and a checkpoint of other weights is refused before anything is read."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tarragon_jax as tj
from tarragon_jax import checkpoint_parts
from tarragon_jax.checkpoint import MIN_CHUNK_BYTES, weights_fingerprint
from tarragon_jax.layers.params import slot_experts, without_experts
from tarragon_jax.weights_source import load_worker_weights
from tarragon_jax.worker.placement import place
from tests.hf_models import random_params

# Qwen2-MoE: a shared expert and q/k/v biases, so every optional AW weight is present.
CONFIG = tj.ModelConfig(family="qwen2_moe", vocab_size=48, hidden_size=16, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=4, num_experts=8, top_k=2,
                        expert_hidden=8, shared_expert_hidden=8, attention_bias=True,
                        norm_topk_prob=False, max_seq_len=32)
PLACEMENT = place(CONFIG.num_layers, CONFIG.num_experts, num_ew=3, shadows_per_expert=1)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def saved(tmp_path_factory, request):
  cfg = CONFIG.replace(dtype=request.param)
  params = random_params(cfg, seed=3)
  directory = str(tmp_path_factory.mktemp("ckpt"))
  tj.save_checkpoint(directory, params, cfg)
  return directory, cfg, params


def _assert_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                         strict=True):
    assert isinstance(a, np.ndarray) and a.dtype == b.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(a, np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_an_aw_reads_every_weight_but_the_routed_experts(saved):
  directory, cfg, params = saved
  got = load_worker_weights(directory, cfg, expect=weights_fingerprint(params, cfg))
  assert got.layers.moe.experts is None
  _assert_equal(got, without_experts(params))


class _Recorded:
  """A saved array that records the index of every read."""

  def __init__(self, array, reads: list):
    self.array, self.reads, self.shape, self.dtype = array, reads, array.shape, array.dtype

  def __getitem__(self, index):
    self.reads.append(index)
    return self.array[index]


def test_an_ew_reads_its_slots_chunk_by_chunk_and_no_other_expert(saved, monkeypatch):
  directory, cfg, params = saved
  opened = {}
  open_leaf = checkpoint_parts._Leaves.open

  def recording_open(self, name):
    return _Recorded(open_leaf(self, name), opened.setdefault(name, []))

  monkeypatch.setattr(checkpoint_parts._Leaves, "open", recording_open)
  for ew in range(PLACEMENT.num_ew):
    contents = PLACEMENT.contents[:, ew]
    opened.clear()
    got = load_worker_weights(directory, cfg, contents,
                              expect=weights_fingerprint(params, cfg))
    _assert_equal(got, slot_experts(params.layers.moe.experts, contents))
    held = sorted((layer, int(e)) for (layer, _), e in np.ndenumerate(contents) if e >= 0)
    assert len(opened) == 3 and all(sorted(r) == held for r in opened.values()), opened


@pytest.mark.parametrize("expert_hidden", [8, 4096])
def test_each_expert_is_a_chunk_of_its_own_from_a_mebibyte(tmp_path, expert_hidden):
  """Experts of 64 x 8 f32 (2 KiB) share one chunk; of 64 x 4096 (1 MiB), one each."""
  cfg = CONFIG.replace(hidden_size=64, expert_hidden=expert_hidden)
  tj.save_checkpoint(os.fspath(tmp_path), random_params(cfg, seed=1), cfg)
  leaves = checkpoint_parts._Leaves(os.fspath(tmp_path), None, None)
  for name in jax.tree.leaves(leaves.names.layers.moe.experts):
    array = leaves.open(name)
    chunk = array.chunk_layout.read_chunk.shape
    expert_bytes = np.prod(array.shape[2:]) * 4
    assert chunk[2:] == array.shape[2:], name
    assert np.prod(chunk) * 4 <= max(expert_bytes, MIN_CHUNK_BYTES), (name, chunk)
    if expert_bytes >= MIN_CHUNK_BYTES:
      assert chunk[:2] == (1, 1), (name, chunk)


def test_an_empty_slot_is_zeros():
  cfg = CONFIG
  params = random_params(cfg, seed=4)
  contents = np.array([[2, -1], [-1, 7]], np.int32)
  got = slot_experts(params.layers.moe.experts, contents)
  assert not np.any(got.w_up[0, 1]) and not np.any(got.w_down[1, 0])
  np.testing.assert_array_equal(got.w_gate[1, 1], params.layers.moe.experts.w_gate[1, 7])


def test_other_weights_are_refused_before_a_read(saved, monkeypatch):
  directory, cfg, _ = saved
  monkeypatch.setattr(checkpoint_parts._Leaves, "open",
                      lambda self, name: pytest.fail(f"{name} was read"))
  other = weights_fingerprint(random_params(cfg, seed=9), cfg)
  for contents in (None, PLACEMENT.contents[:, 0]):
    with pytest.raises(ValueError, match="other weights than expected"):
      load_worker_weights(directory, cfg, contents, expect=other)


def test_a_checkpoint_with_whole_expert_chunks_reads_the_same(tmp_path):
  """One saved with orbax's default chunks (before experts had chunks of their own)."""
  params = random_params(CONFIG, seed=5)
  with ocp.CheckpointManager(os.fspath(tmp_path)) as mgr:
    mgr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                        config=ocp.args.JsonSave(CONFIG.to_dict()),
                                        metadata=ocp.args.JsonSave({})))
    mgr.wait_until_finished()
  contents = PLACEMENT.contents[:, 1]
  _assert_equal(load_worker_weights(os.fspath(tmp_path), CONFIG, contents),
                slot_experts(params.layers.moe.experts, contents))
  _assert_equal(load_worker_weights(os.fspath(tmp_path), CONFIG), without_experts(params))
