"""The co-located MoE sublayer: route, run the chosen experts, combine, add the shared expert.

Legend: M tokens, D model, X top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.experts import expert_ffn, swiglu
from tarragon_jax.layers.params import MoEParams, SharedExpertParams
from tarragon_jax.layers.router import route


def combine(expert_out: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted sum over each token's k experts: [M*X, D] outputs, f32[M, X] weights -> [M, D]."""
  m, k = weights.shape
  y = expert_out.reshape(m, k, -1).astype(jnp.float32)
  return jnp.einsum("MXD,MX->MD", y, weights).astype(expert_out.dtype)


def shared_expert(p: SharedExpertParams | None, x: jax.Array) -> jax.Array:
  """Qwen2-MoE's always-on expert, scaled by a sigmoid gate; zeros when there is none."""
  if p is None:
    return jnp.zeros_like(x)
  gate = jax.nn.sigmoid(jnp.einsum("MD,D->M", x, p.gate))[:, None]
  return gate * swiglu(x, p.w_gate, p.w_up, p.w_down)


def moe(p: MoEParams, cfg: ModelConfig, x: jax.Array) -> jax.Array:
  """MoE FFN of one layer for [M, D] normalized tokens (one layer's weights, no L axis)."""
  ids, weights = route(p.router, cfg, x)
  tokens = jnp.repeat(x, cfg.top_k, axis=0)  # [M*X, D], row m*X+j goes to expert ids[m, j]
  out = expert_ffn(tokens, ids.reshape(-1), p.experts, cfg.expert_kernel, cfg.capacity_factor)
  return combine(out, weights) + shared_expert(p.shared, x)
