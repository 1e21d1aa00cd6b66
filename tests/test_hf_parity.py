"""Logit parity with Hugging Face transformers for the three supported MoE families.

Tiny random HF models (tests/hf_models.py) are saved, imported with `load_hf_checkpoint` and run
in f32 through `forward` and through the cached `extend` (prefill, then one token at a time);
every logit must match HF's full-sequence forward to within TOL.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import tarragon_jax as tj
from tests.hf_models import TinyMoE, build_hf_model, hf_logits

TOL = 1e-4  # max |logit - HF logit|, f32 on CPU; observed errors are ~1e-5 with O(1) logits

BATCH, SEQ = 3, 10
NUM_SLOTS, MAX_LEN = 4, 16
SLOTS = [2, 0, 3]  # row b of each extend call lives in slot SLOTS[b]
PROMPT_LENS = [5, 3, 7]  # prompt tokens per row; the rest of the SEQ tokens are decoded

CASES = {
    "mixtral-mha4-top2": TinyMoE("mixtral", heads=4, kv_heads=4, top_k=2),
    "mixtral-gqa8:1-top1-d44-hd8-window4": TinyMoE(
        "mixtral", hidden=44, heads=8, kv_heads=1, head_dim=8, top_k=1, layers=3,
        extra=(("sliding_window", 4),)),
    "qwen3-gqa4:2-top4-d36-hd8-norm": TinyMoE(
        "qwen3_moe", hidden=36, heads=4, kv_heads=2, head_dim=8, experts=6, top_k=4,
        extra=(("norm_topk_prob", True),)),
    "qwen3-gqa8:1-top2-nonorm-tied-4layers": TinyMoE(
        "qwen3_moe", heads=8, kv_heads=1, head_dim=8, layers=4,
        extra=(("norm_topk_prob", False), ("tie_word_embeddings", True))),
    "qwen2-shared-gqa4:2-top4-nonorm": TinyMoE(
        "qwen2_moe", experts=8, top_k=4, extra=(("norm_topk_prob", False),)),
    "qwen2-shared-gqa4:2-top1-d44-hd8-norm": TinyMoE(
        "qwen2_moe", hidden=44, head_dim=8, top_k=1, extra=(("norm_topk_prob", True),)),
}


@dataclasses.dataclass
class Imported:
  spec: TinyMoE
  path: str
  config: tj.ModelConfig
  params: tj.ModelParams
  tokens: np.ndarray  # i32[BATCH, SEQ]
  ref: np.ndarray  # f32[BATCH, SEQ, V] HF logits


def _import(spec: TinyMoE, directory: str, seed: int, **load_kw) -> Imported:
  path, model = build_hf_model(spec, directory, seed=seed)
  tokens = np.random.default_rng(seed).integers(0, spec.vocab, (BATCH, SEQ)).astype(np.int32)
  config, params = tj.load_hf_checkpoint(path, max_seq_len=MAX_LEN, **load_kw)
  return Imported(spec, path, config, params, tokens, hf_logits(model, tokens))


def _max_err(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got) - want)))


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def imported(request, tmp_path_factory) -> Imported:
  seed = list(CASES).index(request.param)
  return _import(CASES[request.param], str(tmp_path_factory.mktemp("hf")), seed)


def test_config_matches_hf_shape(imported):
  spec, cfg = imported.spec, imported.config
  hf = dict(spec.extra)
  assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (
      spec.family, spec.vocab, spec.hidden, spec.layers)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
      spec.heads, spec.kv_heads, spec.head_dim or spec.hidden // spec.heads)
  assert (cfg.num_experts, cfg.top_k, cfg.expert_hidden) == (spec.experts, spec.top_k,
                                                             spec.expert_hidden)
  assert cfg.shared_expert_hidden == (spec.shared_hidden if spec.family == "qwen2_moe" else 0)
  assert cfg.norm_topk_prob == hf.get("norm_topk_prob", True)
  assert cfg.sliding_window == hf.get("sliding_window")
  assert cfg.tie_embeddings == hf.get("tie_word_embeddings", False)
  assert cfg.max_seq_len == MAX_LEN


def test_forward_matches_hf(imported):
  out = tj.forward(imported.params, imported.config, jnp.asarray(imported.tokens))
  assert out.shape == imported.ref.shape and out.dtype == jnp.float32
  assert _max_err(out, imported.ref) <= TOL


def test_extend_prefill_then_decode_matches_hf(imported):
  """Rows of different prompt lengths prefill together into slots [2, 0, 3], then decode."""
  cfg, params, tokens, ref = imported.config, imported.params, imported.tokens, imported.ref
  cache = tj.KVCache.create(cfg, NUM_SLOTS, max_len=MAX_LEN)
  slots = jnp.asarray(SLOTS, jnp.int32)
  width = max(PROMPT_LENS)
  # Padding after each prompt is a real vocab id, so a leak into the result would show.
  prompt = np.full((BATCH, width), cfg.vocab_size - 1, np.int32)
  for b, n in enumerate(PROMPT_LENS):
    prompt[b, :n] = tokens[b, :n]
  out, cache = tj.extend(params, cfg, cache, jnp.asarray(prompt), slots,
                         jnp.asarray(PROMPT_LENS, jnp.int32))
  want = np.stack([ref[b, n - 1] for b, n in enumerate(PROMPT_LENS)])
  assert out.shape == (BATCH, cfg.vocab_size)
  assert _max_err(out, want) <= TOL
  np.testing.assert_array_equal(np.asarray(cache.lengths), [3, 0, 5, 7])

  # Decode one token per row until every row has SEQ tokens; row 1 idles (n_new = 0) in step 1.
  pos = list(PROMPT_LENS)
  step = 0
  while min(pos) < SEQ:
    n_new = [int(pos[b] < SEQ and not (step == 1 and b == 1)) for b in range(BATCH)]
    tok = np.array([[tokens[b, min(pos[b], SEQ - 1)]] for b in range(BATCH)], np.int32)
    out, cache = tj.extend(params, cfg, cache, jnp.asarray(tok), slots,
                           jnp.asarray(n_new, jnp.int32))
    for b in range(BATCH):
      if n_new[b]:
        assert _max_err(out[b], ref[b, pos[b]]) <= TOL, (step, b, pos[b])
        pos[b] += 1
    step += 1
  assert step == SEQ - min(PROMPT_LENS) + 1
  np.testing.assert_array_equal(np.asarray(cache.lengths), [SEQ, 0, SEQ, SEQ])


KERNEL_CASE = "qwen2-shared-gqa4:2-top4-nonorm"


@pytest.fixture(scope="module")
def kernel_model(tmp_path_factory):
  """One HF model (shared expert, top-4 of 8) for the expert-kernel sweep."""
  path, model = build_hf_model(CASES[KERNEL_CASE], str(tmp_path_factory.mktemp("hfk")), seed=7)
  vocab = CASES[KERNEL_CASE].vocab
  tokens = np.random.default_rng(7).integers(0, vocab, (BATCH, SEQ)).astype(np.int32)
  return path, tokens, hf_logits(model, tokens)


@pytest.mark.parametrize("kernel", ["loop", "capacity", "ragged"])
def test_every_expert_kernel_matches_hf(kernel_model, kernel):
  path, tokens, ref = kernel_model
  cfg, params = tj.load_hf_checkpoint(path, max_seq_len=MAX_LEN, expert_kernel=kernel)
  assert cfg.expert_kernel == kernel
  assert _max_err(tj.forward(params, cfg, jnp.asarray(tokens)), ref) <= TOL


def _matches_or_rejects(spec: TinyMoE, directory: str):
  """A checkpoint the library cannot represent must be refused, never imported wrongly."""
  path, model = build_hf_model(spec, directory, seed=11)
  tokens = np.random.default_rng(11).integers(0, spec.vocab, (2, 8)).astype(np.int32)
  try:
    cfg, params = tj.load_hf_checkpoint(path, max_seq_len=MAX_LEN)
  except tj.CheckpointError:
    return
  assert _max_err(tj.forward(params, cfg, jnp.asarray(tokens)), hf_logits(model, tokens)) <= TOL


def test_qwen3_attention_bias_is_imported_or_refused(tmp_path):
  _matches_or_rejects(TinyMoE("qwen3_moe", extra=(("attention_bias", True),)), str(tmp_path))


def test_qwen2_per_layer_sliding_window_is_imported_or_refused(tmp_path):
  spec = TinyMoE("qwen2_moe", extra=(("use_sliding_window", True), ("sliding_window", 3),
                                     ("max_window_layers", 1)))
  _matches_or_rejects(spec, str(tmp_path))
