"""The decoder: embed, scanned decoder layers, final norm, logits.

`extend` is the one cached entry point: it appends T tokens per row to that row's slot, which
is prefill when the slot is empty and decode when T = 1. `forward` is the cache-free full pass.
Legend: B rows, T tokens per row, D model, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.attention import attention
from tarragon_jax.layers.kv_cache import KVCache
from tarragon_jax.layers.moe import moe
from tarragon_jax.layers.norms import rms_norm
from tarragon_jax.layers.params import LayerParams, ModelParams


def embed(params: ModelParams, tokens: jax.Array) -> jax.Array:
  """i32[B, T] -> [B, T, D]."""
  return params.embed[tokens]


def _explicit_axes() -> bool:
  """Whether the mesh in context has explicit axes (`jax.make_mesh`'s default): the model's
  code leaves sharding to XLA (auto axes), so it runs under `auto_axes` there."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and not mesh.are_all_axes_auto


def _batch_spec(tokens: jax.Array, trailing: int) -> P:
  """The tokens' sharding of the batch axis, for an output with `trailing` more axes."""
  return P(jax.typeof(tokens).sharding.spec[0], *[None] * trailing)


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


def _int_array(fn: str, name: str, x, ndim: int, what: str):
  """`x` as an int array of `ndim` axes (lists and numpy arrays converted to int32; a jax array,
  or a traced value inside the caller's own jit, checked only); ValueError naming the argument
  otherwise."""
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{fn}: {name} has dtype {x.dtype}; give integers ({what})")
  if x.ndim != ndim:
    raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}; expected {what}")
  return x if isinstance(x, jax.Array) else x.astype(np.int32)


def extend(params: ModelParams, config: ModelConfig, cache: KVCache, tokens, slots, n_new):
  """Appends tokens to slots and returns the logits of each row's last real token.

  Args:
    params: model weights.
    config: model config (static).
    cache: KV cache (donated: the one passed in is invalid after the call).
    tokens: i32[B, T]; slots: i32[B]; n_new: i32[B], 1 <= n_new[b] <= T for live rows (arrays
      or Python lists).
  Returns:
    (f32[B, V] logits at position n_new[b] - 1 of each row, updated cache).
  Raises:
    ValueError: an argument of the wrong rank or a non-integer one.
  """
  tokens = _int_array("extend", "tokens", tokens, 2, "i32[B, T]")
  slots = _int_array("extend", "slots", slots, 1, "i32[B], a KV slot per row")
  n_new = _int_array("extend", "n_new", n_new, 1, "i32[B], new tokens per row")
  return _extend(params, config, cache, tokens, slots, n_new)


@functools.partial(jax.jit, static_argnames="config", donate_argnames="cache")
def _extend(params: ModelParams, config: ModelConfig, cache: KVCache, tokens, slots, n_new):
  def run(params, cache, tokens, slots, n_new):
    x, cache = hidden_states(params, config, cache, tokens, slots, n_new)
    last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
    return logits(params, config, last), cache

  if _explicit_axes():
    cache_specs = jax.tree.map(lambda a: jax.typeof(a).sharding.spec, cache)
    run = jax.sharding.auto_axes(run, out_sharding=(_batch_spec(tokens, 1), cache_specs))
  return run(params, cache, tokens, slots, n_new)


def forward(params: ModelParams, config: ModelConfig, tokens) -> jax.Array:
  """Full causal forward pass with no persistent cache.

  Args:
    params: model weights (sharded as the user likes: on a mesh with explicit axes the logits
      are sharded over the batch as `tokens` are).
    config: model config.
    tokens: i32[B, T] (an array or a Python list).
  Returns:
    f32[B, T, V] logits.
  Raises:
    ValueError: `tokens` is not a 2-D integer array.
  """
  return _forward(params, config, _int_array("forward", "tokens", tokens, 2, "i32[B, T]"))


@functools.partial(jax.jit, static_argnames="config")
def _forward(params: ModelParams, config: ModelConfig, tokens: jax.Array) -> jax.Array:
  def run(params, tokens):
    B, T = tokens.shape
    cache = KVCache.create(config, B, max_len=T)
    slots = jnp.arange(B, dtype=jnp.int32)
    x, _ = hidden_states(params, config, cache, tokens, slots, jnp.full((B,), T, jnp.int32))
    return logits(params, config, x)

  if _explicit_axes():
    run = jax.sharding.auto_axes(run, out_sharding=_batch_spec(tokens, 2))
  return run(params, tokens)
