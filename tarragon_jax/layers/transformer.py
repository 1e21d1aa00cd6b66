"""The decoder: embed, scanned decoder layers, final norm, logits.

`extend` is the one cached entry point: it appends T tokens per row to that row's slot, which
is prefill when the slot is empty and decode when T = 1. `forward` is the cache-free full pass.
Legend: B rows, T tokens per row, D model, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.attention import attention
from tarragon_jax.layers.kv_cache import KVCache
from tarragon_jax.layers.moe import moe
from tarragon_jax.layers.norms import rms_norm
from tarragon_jax.layers.params import LayerParams, ModelParams


def embed(params: ModelParams, tokens: jax.Array) -> jax.Array:
  """i32[B, T] -> [B, T, D]."""
  return params.embed[tokens]


def attention_half(lp: LayerParams, cfg: ModelConfig, x, cache: KVCache, layer, slots, n_new):
  """Pre-norm attention plus residual for one layer (the part an attention worker runs)."""
  h, cache = attention(lp.attn, cfg, rms_norm(x, lp.attn_norm, cfg.rms_eps), cache, layer,
                       slots, n_new)
  return x + h, cache


def moe_half(lp: LayerParams, cfg: ModelConfig, x):
  """Pre-norm MoE plus residual for one layer, co-located. x: [B, T, D]."""
  B, T, D = x.shape
  h = moe(lp.moe, cfg, rms_norm(x, lp.mlp_norm, cfg.rms_eps).reshape(B * T, D))
  return x + h.reshape(B, T, D)


def logits(params: ModelParams, cfg: ModelConfig, x: jax.Array) -> jax.Array:
  """Final norm and LM head: [..., D] -> f32[..., V]."""
  x = rms_norm(x, params.final_norm, cfg.rms_eps)
  return jnp.einsum("...D,DV->...V", x, params.lm_head, preferred_element_type=jnp.float32)


def hidden_states(params: ModelParams, cfg: ModelConfig, cache: KVCache, tokens, slots, n_new):
  """Runs all layers over new tokens; returns final hidden states [B, T, D] and the cache.

  Args:
    tokens: i32[B, T]; row b has n_new[b] real tokens, then padding.
    slots: i32[B] cache slot of each row (distinct).
    n_new: i32[B] real tokens per row (0 leaves the slot untouched).
  """
  x = embed(params, tokens)

  def body(carry, layer):
    x, cache = carry
    lp = jax.tree.map(lambda w: w[layer], params.layers)
    x, cache = attention_half(lp, cfg, x, cache, layer, slots, n_new)
    return (moe_half(lp, cfg, x), cache), None

  (x, cache), _ = jax.lax.scan(body, (x, cache), jnp.arange(cfg.num_layers))
  return x, cache.advance(slots, n_new)


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def extend(params: ModelParams, cfg: ModelConfig, cache: KVCache, tokens, slots, n_new):
  """Appends tokens to slots and returns the logits of each row's last real token.

  Args:
    params: model weights.
    cfg: model config (static).
    cache: KV cache (donated).
    tokens: i32[B, T]; slots: i32[B]; n_new: i32[B], 1 <= n_new[b] <= T for live rows.
  Returns:
    (f32[B, V] logits at position n_new[b] - 1 of each row, updated cache).
  """
  x, cache = hidden_states(params, cfg, cache, tokens, slots, n_new)
  last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
  return logits(params, cfg, last), cache


@functools.partial(jax.jit, static_argnames="config")
def forward(params: ModelParams, config: ModelConfig, tokens: jax.Array) -> jax.Array:
  """Full causal forward pass with no persistent cache.

  Args:
    params: model weights.
    config: model config.
    tokens: i32[B, T].
  Returns:
    f32[B, T, V] logits.
  """
  B, T = tokens.shape
  cache = KVCache.create(config, B, max_len=T)
  slots = jnp.arange(B, dtype=jnp.int32)
  x, _ = hidden_states(params, config, cache, tokens, slots, jnp.full((B,), T, jnp.int32))
  return logits(params, config, x)
