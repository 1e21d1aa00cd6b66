"""Tiny random models for tests: Hugging Face MoE models built locally (no downloads), and
native tarragon_jax params drawn with numpy.

Not a test file. `build_hf_model` makes a Mixtral, Qwen3-MoE or Qwen2-MoE causal LM with a few
layers and experts, re-initializes every weight from a seeded normal with a larger std than HF's
0.02 (so logits are O(1) and each token picks different experts), and `save_pretrained`s it in
f32, ready for `tarragon_jax.load_hf_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np

import tarragon_jax as tj

# torch and transformers are imported on first use, so tests that only need `random_params`
# do not pay for them.
_FAMILIES = {  # family -> (HF config class, HF model class), by name in `transformers`
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
}


def _hf_classes(family: str):
  import transformers

  return tuple(getattr(transformers, name) for name in _FAMILIES[family])


@dataclasses.dataclass(frozen=True)
class TinyMoE:
  """Shape of a tiny HF MoE model; `extra` goes to the HF config as is (e.g. norm_topk_prob)."""

  family: str = "mixtral"
  vocab: int = 96
  hidden: int = 32
  layers: int = 2
  heads: int = 4
  kv_heads: int = 2
  head_dim: int | None = None  # None: hidden // heads, as HF does
  experts: int = 4
  top_k: int = 2
  expert_hidden: int = 24
  shared_hidden: int = 20  # Qwen2-MoE only
  extra: tuple[tuple[str, object], ...] = ()

  def hf_config(self):
    config_cls, _ = _hf_classes(self.family)
    kw = dict(
        vocab_size=self.vocab,
        hidden_size=self.hidden,
        num_hidden_layers=self.layers,
        num_attention_heads=self.heads,
        num_key_value_heads=self.kv_heads,
        num_experts_per_tok=self.top_k,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    if self.head_dim is not None:
      kw["head_dim"] = self.head_dim
    if self.family == "mixtral":
      kw.update(num_local_experts=self.experts, intermediate_size=self.expert_hidden)
    else:
      kw.update(num_experts=self.experts, moe_intermediate_size=self.expert_hidden,
                intermediate_size=self.expert_hidden)
    if self.family == "qwen2_moe":
      kw["shared_expert_intermediate_size"] = self.shared_hidden
    kw.update(dict(self.extra))
    return config_cls(**kw)


def reinit_(model, seed: int, std: float = 0.25) -> None:
  """Re-draws every parameter of a torch model: norm scales 1 +/- 0.1, the rest normal(0, std)."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(std * noise)


def build_hf_model(spec: TinyMoE, directory: str, seed: int = 0, std: float = 0.25):
  """Builds, re-initializes and saves a tiny HF model of `spec` under `directory`.

  Returns:
    (the saved checkpoint directory, the torch model in eval mode, f32).
  """
  import torch

  _, model_cls = _hf_classes(spec.family)
  torch.manual_seed(seed)
  model = model_cls(spec.hf_config()).to(torch.float32).eval()
  reinit_(model, seed, std)
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(directory)
  return directory, model


def hf_logits(model, tokens) -> np.ndarray:
  """Full-sequence logits f32[B, T, V] of an HF causal LM for int tokens [B, T] (numpy ok)."""
  import torch

  with torch.no_grad():
    ids = torch.as_tensor(tokens, dtype=torch.long)
    return model(input_ids=ids, use_cache=False).logits.float().numpy()


def random_params(cfg, seed: int = 0, std: float = 0.3):
  """ModelParams for `cfg` drawn with numpy: norm scales 1 +/- 0.1, the rest normal(0, std).

  Shapes come from `init_params` by `jax.eval_shape`, which compiles nothing: on a 2-core CPU,
  compiling init_params' threefry draws takes seconds, which this helper avoids.
  """
  shapes = jax.eval_shape(functools.partial(tj.init_params, cfg), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    noise = rng.normal(size=s.shape).astype(np.float32)
    value = 1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else std * noise
    return jax.numpy.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)
