"""Attention and expert workers: each owns one cell, its weights and (AW) its KV cache.

Workers do device work only; which request sits in which slot is the engine's business.
Everything a worker receives from another cell arrives through `Transfers.send`. Each worker is
a failure domain (`FaultDomain`): a killed worker's arrays are deleted and a call raises
`WorkerDead`; a hung worker returns None from every call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.kv_cache import KVCache
from tarragon_jax.layers.params import ExpertParams, ModelParams, abstract_params, logical_axes
from tarragon_jax.mesh.cells import AW_RULES, EW_RULES, Cell
from tarragon_jax.mesh.transfer import Transfers
from tarragon_jax.worker import datapath
from tarragon_jax.worker.buckets import all_buckets, bucket
from tarragon_jax.worker.fault_domain import FaultDomain
from tarragon_jax.worker.placement import Placement

RESTORE_BUCKET = 16  # a restore pads the KV it writes to a bucket of at least this many tokens


@jax.jit
def _reset_lengths(cache: KVCache, fresh) -> KVCache:
  return dataclasses.replace(cache, lengths=jnp.where(fresh, 0, cache.lengths))


class AttentionWorker(FaultDomain):
  """Holds attention weights, the router and a KV cache of `num_slots` request slots."""

  def __init__(self, index: int, cell: Cell, cfg: ModelConfig, params: ModelParams,
               num_slots: int, transfers: Transfers, snapshots: bool = True,
               host_inputs: bool = False):
    """`snapshots`: each step also returns its new KV for the snapshot store. `host_inputs`:
    the EWs' results arrive as host arrays (a worker process), so `warm_up` compiles for those
    (a jitted call compiles again for inputs of another kind)."""
    self.index, self.cell, self.cfg, self.num_slots = index, cell, cfg, num_slots
    self.snapshots, self.host_inputs = snapshots, host_inputs
    self.name = f"aw{index}"
    self.transfers = transfers
    aw_params = datapath.attention_params(params)
    axes = datapath.attention_params(logical_axes(cfg))
    shardings = cell.shardings_for(AW_RULES, axes, datapath.attention_params(abstract_params(cfg)))
    # The worker deletes its arrays when it is killed, so they must not share a buffer with the
    # caller's params: jax 0.10.2 aliases the source buffer into a multi-device replicated
    # device_put even with may_alias=False, hence a copy in place first (no compile).
    owned = jax.tree.map(
        lambda a: jax.device_put(a, a.sharding, may_alias=False) if isinstance(a, jax.Array)
        else a, aw_params)
    self.params = jax.device_put(owned, shardings, may_alias=False)
    cache = KVCache.create(cfg, num_slots, sharding=cell.replicated())
    kv = cell.sharding(AW_RULES, ("layers", "slots", "seq", "kv_heads", "head_dim"), cache.k.shape)
    self.cache = jax.device_put(cache, KVCache(kv, kv, cell.replicated()))
    self.slots = self.put(np.arange(num_slots, dtype=np.int32))  # row b reads/writes slot b
    self.x = self.x_in = self.h = self.dest = self.weights = self.lost = None
    self.bad = None  # bool[B] rows of this step whose result cannot be computed
    self._none_bad = self.put(np.zeros((num_slots,), bool))  # each step starts from it
    self._missing: dict[int, jax.Array] = {}

  def put(self, array):
    """Host data onto this worker's cell, replicated: for data that every layer reads.

    A host input that one call reads (tokens, sampling settings, a restore's KV) is not put
    first: it goes straight into the jitted call, whose C++ dispatch copies it onto the cell
    about 8x cheaper than a `device_put` before the call (~150 -> ~20 us for three small arrays
    here; each numpy argument adds ~2 us to a call, a put costs ~35 us).
    """
    return jax.device_put(array, self.cell.replicated())

  def begin(self, tokens: np.ndarray, n_new: np.ndarray, fresh: np.ndarray):
    """Starts a step over rows = all slots: tokens i32[B, T], n_new i32[B], fresh bool[B].

    Returns True, or None if the worker is hung.
    """
    if not self._serving():
      return None
    self.n_new = self.put(n_new.astype(np.int32))  # read by every layer: put once (see `put`)
    if fresh.any():
      self.cache = _reset_lengths(self.cache, fresh)
    self.x = datapath.aw_embed(self.params, tokens.astype(np.int32))
    self.bad = self._none_bad
    return True

  def attend(self, layer, active, num_ew: int, slots_per_layer: int):
    """Attention + routing for one layer.

    Returns:
      (per-EW packed buffers, tokens sent to each EW i32[W]), or None if the worker is hung.
    """
    if not self._serving():
      return None
    self.x_in = self.x
    (self.x, self.cache, bufs, counts, self.dest, self.weights, self.h,
     self.lost) = datapath.aw_attend_and_pack(
         self.params, self.cfg, self.x, self.cache, layer, self.slots, self.n_new, active,
         num_ew=num_ew, slots_per_layer=slots_per_layer)
    return bufs, counts

  def replay(self, layer, active, num_ew: int, slots_per_layer: int):
    """Repeats this layer's attention and packing from its input under a new routing table.

    Attention rewrites the same KV at the same positions, so the cache is unchanged; only the
    buffers differ (experts of a failed EW now go to their next replica).
    """
    if not self._serving():
      return None
    self.x = self.x_in
    return self.attend(layer, active, num_ew, slots_per_layer)

  def missing(self, capacity: int) -> jax.Array:
    """An all-NaN [C, D] result on this cell, standing in for an EW that sent nothing: read
    only where a token was routed to that EW, and then it marks the token's row bad (never a
    silent zero)."""
    if capacity not in self._missing:
      self._missing[capacity] = self.put(np.full((capacity, self.cfg.hidden_size), np.nan,
                                                 self.cfg.dtype))
    return self._missing[capacity]

  def combine(self, layer, results):
    """Adds the EWs' results (and the shared expert) to the residual; True, or None if hung."""
    if not self._serving():
      return None
    self.x, self.bad = datapath.aw_combine(self.params, self.cfg, self.x, self.h, layer,
                                           tuple(results), self.dest, self.weights, self.bad,
                                           self.lost)
    return True

  def sample(self, key_data, step, temperature, top_p):
    """Samples each row's next token; None if hung.

    Returns:
      (i32[B] tokens, `datapath.BAD_TOKEN` for a row whose result could not be computed, the
      step's KV [2, L, B, T, K, H] (k, v) or None without snapshots), device arrays not yet
      fetched.
    """
    if not self._serving():
      return None
    tokens, self.cache, segment = datapath.aw_finish(
        self.params, self.cfg, self.x, self.cache, self.slots, self.n_new,
        key_data, step, temperature, top_p, self.bad, snapshot=self.snapshots)
    return tokens, segment

  def restore(self, slot: int, k: np.ndarray, v: np.ndarray) -> int:
    """Writes a request's KV (host [L, n, K, H]) into `slot`; returns the bytes moved."""
    if not self._serving():
      return 0
    n = k.shape[1]
    P = bucket(n, RESTORE_BUCKET, self.cache.max_len)
    pad = ((0, 0), (0, P - n), (0, 0), (0, 0))
    self.cache = datapath.aw_restore(self.cache, np.int32(slot), np.pad(k, pad), np.pad(v, pad),
                                     np.int32(n))
    return k.nbytes + v.nbytes

  def sync(self) -> bool:
    """Blocks until this worker's pending device work is done."""
    self.cache.lengths.block_until_ready()
    return True

  def cache_copy(self):
    """Device copies (k, v, lengths) of the whole cache, for a base snapshot."""
    if not self._serving():
      return None
    return datapath.aw_cache_copy(self.cache)

  def warm_up(self, seq_lens, num_ew: int, slots_per_layer: int, active):
    """Compiles this cell's executables for each step length T in `seq_lens`.

    For a fresh worker: every slot is left empty (and slot 0's KV zeroed).
    """
    B = self.num_slots
    for T in seq_lens:
      self.begin(np.zeros((B, T), np.int32), np.zeros((B,), np.int32), np.ones((B,), bool))
      bufs, _ = self.attend(0, active, num_ew, slots_per_layer)
      zeros = [np.zeros((b.shape[0], self.cfg.hidden_size), self.cfg.dtype) for b in bufs]
      self.combine(0, zeros if self.host_inputs else [self.put(z) for z in zeros])
      zeros = np.zeros((B,), np.int32)
      self.sample(np.zeros((B, 2), np.uint32), zeros, zeros.astype(np.float32),
                  np.ones((B,), np.float32))
    for P in all_buckets(RESTORE_BUCKET, self.cache.max_len):  # into slot 0, length 0
      k = np.zeros((self.cfg.num_layers, P, self.cfg.num_kv_heads, self.cfg.head_dim),
                   self.cfg.dtype)
      self.cache = datapath.aw_restore(self.cache, np.int32(0), k, k, np.int32(0))
    jax.block_until_ready(self.cache_copy())  # the base snapshot a new store is sent
    self.cache.lengths.block_until_ready()


def ew_weights(params: ModelParams, placement: Placement, ew: int) -> ExpertParams:
  """Host arrays [L, S, ...] of the experts (primaries and shadows) that EW `ew` holds."""
  contents = placement.contents[:, ew]  # [L, S]
  held = contents >= 0
  idx = np.where(held, contents, 0)
  layers = np.arange(contents.shape[0])[:, None]

  def gather(w):
    w = np.asarray(w)[layers, idx]
    return np.where(held[:, :, None, None], w, 0).astype(w.dtype)

  e = params.layers.moe.experts
  return ExpertParams(gather(e.w_gate), gather(e.w_up), gather(e.w_down))


class ExpertWorker(FaultDomain):
  """Holds the expert slots of its placement and runs them for all AWs, one layer at a time."""

  def __init__(self, index: int, cell: Cell, cfg: ModelConfig, host: ExpertParams, num_ew: int,
               transfers: Transfers, host_inputs: bool = False):
    """`host`: the experts this EW holds, host arrays [L, S, ...] (see `ew_weights`).
    `host_inputs`: the AWs' buffers arrive as host arrays (a worker process), so `warm_up`
    compiles for those: otherwise the all-slots executable, first used in a failover's replay,
    would compile there."""
    self.index, self.cell, self.cfg, self.transfers = index, cell, cfg, transfers
    self.host_inputs = host_inputs
    self.name = f"ew{index}"
    self.num_ew = num_ew
    axes = ExpertParams(("layers", "slots", "embed", "expert_hidden"),
                        ("layers", "slots", "embed", "expert_hidden"),
                        ("layers", "slots", "expert_hidden", "embed"))
    shardings = cell.shardings_for(EW_RULES, axes, host)
    self.weights = jax.device_put(host, shardings)
    self._empty: dict[int, jax.Array] = {}

  def empty_buffer(self, capacity: int):
    """A packed buffer with no tokens, standing in for an AW that sent nothing."""
    if capacity not in self._empty:
      self._empty[capacity] = jax.device_put(datapath.empty_buffer(self.cfg, capacity),
                                             self.cell.replicated())
    return self._empty[capacity]

  def run_layer(self, layer, inbox: list, slots: int):
    """Runs one layer over the packed buffers of all AWs (inbox[a]: [C, D + 2]), computing the
    first `slots` expert slots (`RoutingTable.computed_slots`).

    Returns per-AW outputs [C, D], or None if the worker is hung.
    """
    if not self._serving():
      return None
    return datapath.ew_experts(self.weights, self.cfg, layer, tuple(inbox), num_ew=self.num_ew,
                               slots=slots)

  def sync(self) -> bool:
    """Blocks until this worker's weights are on its cell."""
    jax.block_until_ready(self.weights)
    return True

  def warm_up(self, capacities, num_aw: int, slot_counts):
    """Compiles the expert call for each buffer capacity and count of computed slots, on empty
    buffers."""
    for c in capacities:
      empty = datapath.empty_buffer(self.cfg, c) if self.host_inputs else self.empty_buffer(c)
      for slots in slot_counts:
        jax.block_until_ready(self.run_layer(0, [empty] * num_aw, slots))
