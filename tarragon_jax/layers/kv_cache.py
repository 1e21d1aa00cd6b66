"""A KV cache addressed by request slot.

The cache is an immutable value: every operation returns a new cache. Slot bookkeeping (which
slot is free) belongs to the scheduler; the cache only stores each slot's KV and length.

Legend: L layers, S slots, T max tokens per slot, K kv heads, H head dim, B batch of slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tarragon_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  k: Any  # [L, S, T, K, H]
  v: Any  # [L, S, T, K, H]
  lengths: Any  # i32[S], tokens stored in each slot (0 = empty)

  @classmethod
  def create(cls, config: ModelConfig, num_slots: int, max_len: int | None = None,
             sharding=None) -> KVCache:
    """An empty cache of `num_slots` slots of `max_len` (default config.max_seq_len) tokens."""
    if num_slots <= 0:
      raise ValueError(f"KVCache: num_slots={num_slots} must be > 0")
    max_len = config.max_seq_len if max_len is None else max_len
    shape = (config.num_layers, num_slots, max_len, config.num_kv_heads, config.head_dim)
    k = jnp.zeros(shape, jnp.dtype(config.dtype), device=sharding)
    v = jnp.zeros(shape, jnp.dtype(config.dtype), device=sharding)
    return cls(k, v, jnp.zeros((num_slots,), jnp.int32, device=sharding))

  @property
  def num_slots(self) -> int:
    return self.k.shape[1]

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  def write_layer(self, layer, slots, positions, k_new, v_new) -> KVCache:
    """Writes new KV of one layer; positions >= max_len are dropped (padding).

    Args:
      layer: layer index (may be traced).
      slots: i32[B] slot of each row.
      positions: i32[B, T] target position of each new token.
      k_new, v_new: [B, T, K, H].
    """
    idx = (layer, slots[:, None], positions)
    return dataclasses.replace(
        self,
        k=self.k.at[idx].set(k_new.astype(self.k.dtype), mode="drop"),
        v=self.v.at[idx].set(v_new.astype(self.v.dtype), mode="drop"),
    )

  def advance(self, slots, n_new) -> KVCache:
    """Adds n_new[b] tokens to the length of slots[b]."""
    return dataclasses.replace(self, lengths=self.lengths.at[slots].add(n_new))

  def append(self, slots, k_tok, v_tok) -> KVCache:
    """Appends one token to each of `slots` (i32[B]); k_tok, v_tok: [L, B, K, H]."""
    positions = self.lengths[slots]  # [B]
    k = self.k.at[:, slots, positions].set(k_tok.astype(self.k.dtype), mode="drop")
    v = self.v.at[:, slots, positions].set(v_tok.astype(self.v.dtype), mode="drop")
    return KVCache(k, v, self.lengths).advance(slots, jnp.ones_like(slots))

  def inject(self, slot: int, k, v) -> KVCache:
    """Writes a request's whole KV into `slot` from outside (prefill result or a restore).

    Args:
      slot: target slot.
      k, v: [L, n, K, H] with n <= max_len; the slot's length becomes n.
    """
    self._check_slot(slot)
    n = k.shape[1]
    if k.shape != v.shape or k.shape[0] != self.k.shape[0] or k.shape[2:] != self.k.shape[3:]:
      raise ValueError(f"KVCache.inject: k {k.shape} / v {v.shape} do not match the cache's "
                       f"[L={self.k.shape[0]}, n, K={self.k.shape[3]}, H={self.k.shape[4]}]")
    if n > self.max_len:
      raise ValueError(f"KVCache.inject: {n} tokens do not fit a slot of {self.max_len}")
    cleared = self.drop(slot)
    return KVCache(
        cleared.k.at[:, slot, :n].set(jnp.asarray(k, self.k.dtype)),
        cleared.v.at[:, slot, :n].set(jnp.asarray(v, self.v.dtype)),
        cleared.lengths.at[slot].set(n),
    )

  def read(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """The KV stored in `slot` as host arrays [L, length, K, H]."""
    self._check_slot(slot)
    n = int(self.lengths[slot])
    return np.asarray(self.k[:, slot, :n]), np.asarray(self.v[:, slot, :n])

  def drop(self, slot: int) -> KVCache:
    """Empties `slot`: its length becomes 0 and its KV is zeroed."""
    self._check_slot(slot)
    return KVCache(self.k.at[:, slot].set(0), self.v.at[:, slot].set(0),
                   self.lengths.at[slot].set(0))

  def _check_slot(self, slot: int):
    if not 0 <= int(slot) < self.num_slots:
      raise ValueError(f"KVCache: slot {slot} out of range [0, {self.num_slots})")
