"""The compiled pieces of the disaggregated datapath, one layer at a time.

Attention-worker side: `aw_attend_and_pack` (attention, router, ERT lookup, fixed-capacity
per-EW buffers) and `aw_combine` (weighted combine of what the EWs sent back, shared expert,
residual). Expert-worker side: `ew_experts` (one batched expert call over the buffers of all
AWs for one layer). The layer index and the routing table are array inputs, so neither a new
layer nor a rerouted expert compiles anything.

An AW's buffer for one EW is one array [C, D + 2]: each row a token's normalized MoE input
followed by the EW-local expert slot it goes to, as two base-256 digits of slot + 1 in the model
dtype (integers below 256 are exact even in bfloat16; 0: an empty row). One array per (AW, EW)
pair and layer, not two: a cross-cell array has a fixed cost whatever its size. (The ids are
digits, not bit-cast i32: XLA may canonicalize a bfloat16 NaN pattern in a concatenate.)

Legend: B rows, T tokens per row, M = B*T tokens, X top-k, D model, W expert workers,
C = M*X buffer capacity per EW (every assignment fits even if all go to one EW), S slots per
EW per layer, A attention workers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.experts import expert_ffn
from tarragon_jax.layers.kv_cache import KVCache
from tarragon_jax.layers.moe import combine, shared_expert
from tarragon_jax.layers.norms import rms_norm
from tarragon_jax.layers.params import ExpertParams, ModelParams
from tarragon_jax.layers.router import route
from tarragon_jax.layers.sampling import sample
from tarragon_jax.layers.transformer import attention_half, embed, logits

SLOT_DIGITS = 2  # base-256 digits of (slot id + 1) at the end of a packed buffer row
MAX_SLOTS = 256 ** SLOT_DIGITS - 1  # slot ids a packed buffer can carry: 0 .. MAX_SLOTS - 1
BAD_TOKEN = -1  # sampled for a row whose result could not be computed (see `aw_finish`)
LOOP_POSITIONS = 32  # a step's KV for the snapshot store: a loop up to this many, else a gather


# Most significant digit first. A numpy constant: a jax array here would start JAX's backends
# at import (after which `jax_num_cpu_devices` can no longer be set).
_PLACES = 256 ** np.arange(SLOT_DIGITS - 1, -1, -1, dtype=np.int32)


def pack(tokens, slots):
  """A packed buffer [C, D + 2] of tokens [C, D] and their slot ids i32[C] (-1: empty row)."""
  v = slots.astype(jnp.int32)[:, None] + 1
  digits = (v // _PLACES % 256).astype(tokens.dtype)  # integers < 256: exact even in bf16
  return jnp.concatenate([tokens, digits], axis=1)


def unpack(buf, hidden_size: int):
  """(tokens [C, D], slots i32[C]) of a packed buffer [C, D + 2]."""
  digits = buf[:, hidden_size:].astype(jnp.int32)
  return buf[:, :hidden_size], digits @ _PLACES - 1


def empty_buffer(cfg: ModelConfig, capacity: int) -> np.ndarray:
  """A host buffer [C, D + 2] with no tokens: all zeros (every slot id -1)."""
  return np.zeros((capacity, cfg.hidden_size + SLOT_DIGITS), cfg.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "num_ew", "slots_per_layer"),
                   donate_argnames=("cache",))
def aw_attend_and_pack(p: ModelParams, cfg: ModelConfig, x, cache: KVCache, layer, slots, n_new,
                       active, *, num_ew: int, slots_per_layer: int):
  """Attention of one layer, then routing and packing of per-EW buffers.

  Args:
    p: AW weights (`without_experts`: all but the routed experts).
    x: [B, T, D] residual stream.
    cache: this AW's KV cache (donated).
    layer: i32[] layer index.
    slots, n_new: i32[B] cache slot and real-token count of each row.
    active: i32[L, E] physical slot serving each logical expert (the routing table).
  Returns:
    x after attention [B, T, D]; the cache; per-EW packed buffers (W arrays [C, D + 2], see
    the module docstring); tokens sent to each EW i32[W]; `dest` i32[M*X] where each
    assignment sits in the concatenated buffers; routing weights f32[M, X]; normalized MoE
    input h [M, D]; `lost` bool[B]: a real token of the row was routed to an expert with no
    live replica (the table holds -1 for it), so the row's result cannot be computed.
  """
  if slots_per_layer > MAX_SLOTS:
    raise ValueError(f"slots_per_layer={slots_per_layer}: a packed buffer carries slot ids "
                     f"0..{MAX_SLOTS - 1}")
  lp = jax.tree.map(lambda w: w[layer], p.layers)
  x, cache = attention_half(lp, cfg, x, cache, layer, slots, n_new)
  B, T, D = x.shape
  M, X = B * T, cfg.top_k
  h = rms_norm(x, lp.mlp_norm, cfg.rms_eps).reshape(M, D)
  ids, weights = route(lp.moe.router, cfg, h)
  phys = active[layer][ids].reshape(M * X)
  token = jnp.repeat((jnp.arange(T)[None, :] < n_new[:, None]).reshape(M), X)
  real = token & (phys >= 0)
  lost = jnp.any((token & (phys < 0)).reshape(B, T * X), axis=1)
  ew = jnp.where(real, phys // slots_per_layer, num_ew)  # padding goes to no EW
  onehot = ew[:, None] == jnp.arange(num_ew)[None, :]
  rank = jnp.take_along_axis(jnp.cumsum(onehot, 0) - 1, jnp.minimum(ew, num_ew - 1)[:, None], 1)
  C = M * X
  dest = jnp.where(real, ew * C + rank[:, 0], num_ew * C)
  buf = jnp.zeros((num_ew * C, D), x.dtype).at[dest].set(jnp.repeat(h, X, axis=0), mode="drop")
  local = jnp.full((num_ew * C,), -1, jnp.int32).at[dest].set(phys % slots_per_layer, mode="drop")
  bufs = tuple(pack(buf, local).reshape(num_ew, C, -1))
  counts = jnp.sum(onehot, axis=0, dtype=jnp.int32)  # padding went to no EW
  return x, cache, bufs, counts, dest, weights, h, lost


@functools.partial(jax.jit, static_argnames="cfg")
def aw_combine(p: ModelParams, cfg: ModelConfig, x, h, layer, results, dest, weights, bad, lost):
  """Weighted combine of the EWs' results, plus the shared expert and the residual.

  A row is marked bad, never patched up, when one of its tokens' expert outputs is not finite
  (an EW's stand-in for a missing result is NaN; see `ew_experts` for tokens routed past the
  computed slots) or `lost` says one had no expert to go to. Its residual is zeroed instead of
  carrying NaN on: NaN in the KV cache would outlive the request (a later one in the same slot
  reads masked positions with weight 0, and 0 * NaN is NaN).

  Args:
    results: W arrays [C, D], EW w's outputs for this AW's buffer.
    dest, weights, h, lost: from `aw_attend_and_pack`.
    bad: bool[B] rows already marked bad in this step.
  Returns:
    ([B, T, D] residual stream after this layer, bool[B] bad rows).
  """
  lp = jax.tree.map(lambda w: w[layer], p.layers)
  out = jnp.concatenate(results, axis=0).at[dest].get(mode="fill", fill_value=0)
  y = combine(out, weights) + shared_expert(lp.moe.shared, h)
  finite = jnp.isfinite(y).all(axis=-1).reshape(x.shape[:2]).all(axis=1)  # [B]
  bad = bad | lost | ~finite
  return jnp.where(bad[:, None, None], 0, x + y.reshape(x.shape)), bad


@functools.partial(jax.jit, static_argnames=("cfg", "num_ew", "slots"))
def ew_experts(w: ExpertParams, cfg: ModelConfig, layer, bufs, *, num_ew: int, slots: int):
  """One EW's expert call for one layer over the buffers of all AWs.

  Args:
    w: this EW's experts, [L, S, ...] (its primaries, then its shadows).
    bufs: A packed buffers [C_a, D + 2] (see the module docstring).
    num_ew: EWs in the cluster, to size the expected load of one EW.
    slots: how many of the EW's leading slots to compute, <= S: the routing table routes no
      token past them (`RoutingTable.computed_slots`: the primaries while the shadows idle).
      A token routed past them anyway gets NaN, never a silent zero.
  Returns:
    A arrays [C_a, D]: expert outputs for each AW's buffer (zeros where empty).
  """
  if not 1 <= slots <= w.w_gate.shape[1]:
    raise ValueError(f"ew_experts: slots={slots}; this EW holds 1..{w.w_gate.shape[1]}")
  x, s = unpack(jnp.concatenate(bufs, axis=0), cfg.hidden_size)
  load = max(1, x.shape[0] // (num_ew * cfg.top_k) * cfg.top_k)
  lw = jax.tree.map(lambda a: a[layer, :slots], w)
  y = expert_ffn(x, jnp.where(s < slots, s, -1), lw, cfg.expert_kernel, cfg.capacity_factor,
                 load_tokens=load)
  y = jnp.where((s >= slots)[:, None], jnp.nan, y)
  sizes = [b.shape[0] for b in bufs]
  bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
  return tuple(jnp.split(y, bounds, axis=0))


aw_embed = jax.jit(embed)


@functools.partial(jax.jit, donate_argnames="cache")
def aw_restore(cache: KVCache, slot, k, v, n) -> KVCache:
  """Writes a restored request's KV into `slot`: k, v [L, P, K, H] (P a bucket >= n real)."""
  P = k.shape[1]
  return KVCache(cache.k.at[:, slot, :P].set(k.astype(cache.k.dtype)),
                 cache.v.at[:, slot, :P].set(v.astype(cache.v.dtype)),
                 cache.lengths.at[slot].set(n))


@jax.jit
def aw_cache_copy(cache: KVCache):
  """Fresh copies of k, v and lengths (the next step donates the cache)."""
  return cache.k * 1, cache.v * 1, cache.lengths * 1


@functools.partial(jax.jit, static_argnames=("cfg", "snapshot"), donate_argnames="cache")
def aw_finish(p: ModelParams, cfg: ModelConfig, x, cache: KVCache, slots, n_new, key_data, step,
              temperature, top_p, bad, *, snapshot: bool):
  """Ends a step: samples one token per row from its last real token, advances slot lengths.

  Args:
    bad: bool[B] rows marked bad by `aw_combine` in this step.
  Returns:
    (i32[B] sampled tokens, BAD_TOKEN for a bad row or one whose logits are not finite (greedy
    argmax would pick token 0 from all-NaN logits), the cache, and with `snapshot` the step's
    new KV, k and v stacked [2, L, B, T, K, H], every layer, for the snapshot store (row b's
    positions after n_new[b] are junk; one array: one host copy per step), else None).
  """
  last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
  z = logits(p, cfg, last)
  tokens = sample(z, key_data, step, temperature, top_p)
  tokens = jnp.where(bad | ~jnp.isfinite(z).all(axis=-1), BAD_TOKEN, tokens)
  segment = _new_kv(cache, slots, x.shape[1]) if snapshot else None
  return tokens, cache.advance(slots, n_new), segment


def _new_kv(cache: KVCache, slots, T: int):
  """kv [2, L, B, T, K, H]: positions lengths[slots[b]] + t of each row (clamped to the cache).

  Up to LOOP_POSITIONS positions (decode steps of the usual batches) one at a time in a loop,
  more with one gather (`gathered_kv`): XLA's CPU cost model prices a gather by its whole
  operand (the cache) and splits it over threads, which makes a small gather dearer than the
  loop; past LOOP_POSITIONS the loop's iterations cost more
  (`experiments/bench_snapshot_kv.py` measures both).
  """
  if slots.shape[0] * T > LOOP_POSITIONS:
    return gathered_kv(cache, slots, T)
  L, num_slots, S, K, H = cache.k.shape
  cells = (slots[:, None] * S + _new_positions(cache, slots, T)).reshape(-1)  # [B*T]
  k, v = (c.reshape(L, num_slots * S, K * H) for c in (cache.k, cache.v))
  kv = jax.lax.map(lambda i: jnp.stack([k[:, i], v[:, i]]), cells)  # [B*T, 2, L, K*H]
  return jnp.moveaxis(kv, 0, 2).reshape(2, L, -1, T, K, H)


def gathered_kv(cache: KVCache, slots, T: int):
  """`_new_kv` as one gather (what it does for more than LOOP_POSITIONS positions)."""
  positions = _new_positions(cache, slots, T)
  return jnp.stack([cache.k[:, slots[:, None], positions], cache.v[:, slots[:, None], positions]])


def _new_positions(cache: KVCache, slots, T: int):
  """i32[B, T]: each row's next T positions, clamped to the cache's last."""
  return jnp.minimum(cache.lengths[slots][:, None] + jnp.arange(T)[None, :], cache.max_len - 1)
