"""GQA attention over a slot-addressed KV cache.

Legend: B batch rows, T new tokens per row, S cached positions, D model, N q heads,
K kv heads, G q heads per kv head (N = K*G), H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.kv_cache import KVCache
from tarragon_jax.layers.norms import rms_norm, rope
from tarragon_jax.layers.params import AttentionParams

_MASKED = -1e30  # finite, so a row with no visible key gives a uniform softmax, not NaN


def project_qkv(p: AttentionParams, cfg: ModelConfig, x, positions):
  """q [B,T,N,H], k/v [B,T,K,H] with bias, q/k norm and RoPE applied as the family does."""
  q = jnp.einsum("BTD,DNH->BTNH", x, p.wq)
  k = jnp.einsum("BTD,DKH->BTKH", x, p.wk)
  v = jnp.einsum("BTD,DKH->BTKH", x, p.wv)
  if p.bq is not None:
    q, k, v = q + p.bq, k + p.bk, v + p.bv
  if p.q_norm is not None:
    q = rms_norm(q, p.q_norm, cfg.rms_eps)
    k = rms_norm(k, p.k_norm, cfg.rms_eps)
  return rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta), v


def attend(cfg: ModelConfig, q, keys, values, q_positions, kv_lengths):
  """Causal softmax attention of new queries over cached keys.

  Args:
    q: [B, T, N, H] queries at absolute positions `q_positions` (i32[B, T]).
    keys, values: [B, S, K, H] cache rows (the new tokens already written).
    kv_lengths: i32[B] valid cached positions per row after the write.
  Returns:
    [B, T, N, H].
  """
  B, T, N, H = q.shape
  qg = q.reshape(B, T, cfg.num_kv_heads, cfg.q_per_kv, H)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, keys, preferred_element_type=jnp.float32)
  scores = scores * (H ** -0.5)
  s_pos = jnp.arange(keys.shape[1])[None, None, :]  # [1, 1, S]
  qp = q_positions[:, :, None]  # [B, T, 1]
  visible = (s_pos <= qp) & (s_pos < kv_lengths[:, None, None])
  if cfg.sliding_window is not None:
    visible &= s_pos > qp - cfg.sliding_window
  scores = jnp.where(visible[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values)
  return out.reshape(B, T, N, H)


def attention(p: AttentionParams, cfg: ModelConfig, x, cache: KVCache, layer, slots, n_new):
  """One attention sublayer that appends the new tokens' KV to the cache and attends.

  Args:
    p: this layer's attention weights.
    x: [B, T, D] normalized inputs; row b holds n_new[b] real tokens, then padding.
    cache: the KV cache; row b reads and writes slot slots[b], starting at its length.
    layer: layer index into the cache (may be traced).
    slots: i32[B]; n_new: i32[B].
  Returns:
    ([B, T, D] attention output before the residual, the updated cache). Lengths are not
    advanced here: the caller does it once after the last layer.
  """
  T = x.shape[1]
  starts = cache.lengths[slots]  # [B]
  t = jnp.arange(T)[None, :]
  positions = starts[:, None] + t  # [B, T]
  q, k, v = project_qkv(p, cfg, x, positions)
  write_pos = jnp.where(t < n_new[:, None], positions, cache.max_len)  # padding -> dropped
  cache = cache.write_layer(layer, slots, write_pos, k, v)
  keys = cache.k[layer][slots]
  values = cache.v[layer][slots]
  out = attend(cfg, q, keys, values, positions, starts + n_new)
  return jnp.einsum("BTNH,NHD->BTD", out, p.wo), cache
