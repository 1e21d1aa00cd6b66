"""Attention and expert workers: each owns one cell, its weights and (AW) its KV cache.

Workers do device work only; which request sits in which slot is the engine's business.
Everything a worker receives from another cell arrives through `Transfers.send`.
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
from tarragon_jax.resilience.placement import Placement
from tarragon_jax.serving import datapath


@jax.jit
def _reset_lengths(cache: KVCache, fresh) -> KVCache:
  return dataclasses.replace(cache, lengths=jnp.where(fresh, 0, cache.lengths))


class AttentionWorker:
  """Holds attention weights, the router and a KV cache of `num_slots` request slots."""

  def __init__(self, index: int, cell: Cell, cfg: ModelConfig, params: ModelParams,
               num_slots: int, transfers: Transfers):
    self.index, self.cell, self.cfg, self.num_slots = index, cell, cfg, num_slots
    self.transfers = transfers
    aw_params = datapath.attention_params(params)
    axes = datapath.attention_params(logical_axes(cfg))
    shardings = cell.shardings_for(AW_RULES, axes, datapath.attention_params(abstract_params(cfg)))
    self.params = jax.device_put(aw_params, shardings)
    cache = KVCache.create(cfg, num_slots, sharding=cell.replicated())
    kv = cell.sharding(AW_RULES, ("layers", "slots", "seq", "kv_heads", "head_dim"), cache.k.shape)
    self.cache = jax.device_put(cache, KVCache(kv, kv, cell.replicated()))
    self.slots = self.put(np.arange(num_slots, dtype=np.int32))  # row b reads/writes slot b
    self.x = self.h = self.dest = self.weights = None

  def put(self, array):
    """Host data (tokens, sampling settings) onto this worker's cell, replicated."""
    return jax.device_put(array, self.cell.replicated())

  def begin(self, tokens: np.ndarray, n_new: np.ndarray, fresh: np.ndarray):
    """Starts a step over rows = all slots: tokens i32[B, T], n_new i32[B], fresh bool[B]."""
    tokens, self.n_new, fresh_dev = self.put(
        (tokens.astype(np.int32), n_new.astype(np.int32), fresh))
    if fresh.any():
      self.cache = _reset_lengths(self.cache, fresh_dev)
    self.x = datapath.aw_embed(self.params, tokens)

  def attend(self, layer, active, num_ew: int, slots_per_layer: int):
    """Attention + routing for one layer; returns per-EW (tokens, local slots) buffers."""
    (self.x, self.cache, bufs, locals_, self.dest, self.weights,
     self.h) = datapath.aw_attend_and_pack(
         self.params, self.cfg, self.x, self.cache, layer, self.slots, self.n_new, active,
         num_ew=num_ew, slots_per_layer=slots_per_layer)
    return bufs, locals_

  def combine(self, layer, results):
    self.x = datapath.aw_combine(self.params, self.cfg, self.x, self.h, layer, tuple(results),
                                 self.dest, self.weights)

  def sample(self, key_data, step, temperature, top_p):
    """Samples each row's next token (a device array, not yet fetched)."""
    tokens, self.cache = datapath.aw_finish(
        self.params, self.cfg, self.x, self.cache, self.slots, self.n_new,
        *self.put((key_data, step, temperature, top_p)))
    return tokens


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


class ExpertWorker:
  """Holds the expert slots of its placement and runs them for all AWs, one layer at a time."""

  def __init__(self, index: int, cell: Cell, cfg: ModelConfig, params: ModelParams,
               placement: Placement, transfers: Transfers):
    self.index, self.cell, self.cfg, self.transfers = index, cell, cfg, transfers
    self.num_ew = placement.num_ew
    host = ew_weights(params, placement, index)
    axes = ExpertParams(("layers", "slots", "embed", "expert_hidden"),
                        ("layers", "slots", "embed", "expert_hidden"),
                        ("layers", "slots", "expert_hidden", "embed"))
    shardings = cell.shardings_for(EW_RULES, axes, host)
    self.weights = jax.device_put(host, shardings)
    self._empty: dict[int, tuple] = {}

  def empty_buffer(self, capacity: int):
    """A (tokens, slots) buffer with no tokens, standing in for an AW that sent nothing."""
    if capacity not in self._empty:
      rep = self.cell.replicated()
      self._empty[capacity] = (
          jax.device_put(np.zeros((capacity, self.cfg.hidden_size), self.cfg.dtype), rep),
          jax.device_put(np.full((capacity,), -1, np.int32), rep))
    return self._empty[capacity]

  def run_layer(self, layer, inbox: list[tuple]):
    """Runs one layer over the buffers of all AWs: inbox[a] = (tokens [C, D], slots i32[C])."""
    tokens = tuple(t for t, _ in inbox)
    slots = tuple(s for _, s in inbox)
    return datapath.ew_experts(self.weights, self.cfg, layer, tokens, slots, num_ew=self.num_ew)
