"""Softmax top-k routing with the variants real MoE checkpoints use.

Mixtral: softmax over all experts, top-k, renormalize. Qwen3-MoE and Qwen2-MoE renormalize only
when `norm_topk_prob`. Legend: M tokens, D model, E experts, X top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tarragon_jax.config import ModelConfig


def route(router_w: jax.Array, cfg: ModelConfig, x: jax.Array):
  """Picks each token's top-k logical experts.

  Args:
    router_w: [D, E] router weights.
    x: [M, D] normalized tokens.
  Returns:
    (expert ids i32[M, X], routing weights f32[M, X]).
  """
  # f32 out of the dot: bf16 logits would tie near-equal experts and change top-k choices
  logits = jnp.einsum("MD,DE->ME", x, router_w, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  weights, ids = jax.lax.top_k(probs, cfg.top_k)
  if cfg.norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return ids.astype(jnp.int32), weights
