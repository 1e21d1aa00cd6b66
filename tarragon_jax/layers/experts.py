"""SwiGLU experts over tokens tagged with an expert slot, with interchangeable kernels.

`expert_ffn` is the one entry point. It serves both the co-located MoE layer (slots = logical
experts) and an expert worker (slots = the experts it holds). Kernels:
  * "ragged": sort by slot and `jax.lax.ragged_dot` (the GPU/TPU kernel); padding rows form
    no group, so they cost no multiply;
  * "capacity": sort-and-pad into [E, C, D] buffers and a batched einsum (fast on CPU); when a
    slot overflows its capacity, a second, always-sufficient branch runs instead, so no token is
    ever dropped;
  * "loop": every slot densely over every token, masked (the slow, obvious reference).
Legend: M tokens, D model, E slots, C capacity per slot, F expert hidden.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tarragon_jax.layers.params import ExpertParams


def swiglu(x, w_gate, w_up, w_down):
  """down(silu(x @ gate) * (x @ up)) for one FFN. x: [..., D]."""
  return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def resolve_kernel(kernel: str) -> str:
  """'auto' picks the sort-and-pad kernel on CPU and ragged_dot elsewhere."""
  if kernel != "auto":
    return kernel
  return "capacity" if jax.default_backend() == "cpu" else "ragged"


def expert_ffn(x: jax.Array, slot_ids: jax.Array, p: ExpertParams, kernel: str = "auto",
               capacity_factor: float = 2.0, load_tokens: int | None = None) -> jax.Array:
  """Runs each token through the expert in its slot.

  Args:
    x: [M, D] tokens.
    slot_ids: i32[M] slot of each token in [0, E); -1 marks padding.
    p: experts stacked on the slot axis: w_gate/w_up [E, D, F], w_down [E, F, D].
    kernel: "auto" | "ragged" | "capacity" | "loop".
    capacity_factor: "capacity" kernel only; slots per expert = ceil(factor * load / E).
    load_tokens: "capacity" kernel only; the expected number of real (non-padding) tokens,
      when x is mostly padding (default M). Overflow still falls back to the exact branch.
  Returns:
    [M, D]: expert output per token, zeros for padding.
  """
  kernel = resolve_kernel(kernel)
  if kernel == "loop":
    return _loop(x, slot_ids, p)
  if kernel == "ragged":
    return _ragged(x, slot_ids, p)
  if kernel == "capacity":
    return _capacity(x, slot_ids, p, capacity_factor * (load_tokens or x.shape[0]) / x.shape[0])
  raise ValueError(f"expert_ffn: kernel={kernel!r}; valid kernels are auto, ragged, capacity, loop")


def _loop(x, slot_ids, p: ExpertParams):
  out = jnp.zeros_like(x)
  for e in range(p.w_gate.shape[0]):
    y = swiglu(x, p.w_gate[e], p.w_up[e], p.w_down[e])
    out = out + jnp.where((slot_ids == e)[:, None], y, 0)
  return out


def ragged_groups(slot_ids: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array]:
  """(order, group_sizes) for `ragged_dot`: tokens sorted by slot, padding (-1) last and in no
  group, so the sizes sum to the number of real tokens and padding is never multiplied. An
  EW's buffers are sized for every AW's worst case while its expected load is about
  rows / num_ew: most rows are padding."""
  ids = jnp.where(slot_ids >= 0, slot_ids, num_slots)
  order = jnp.argsort(ids, stable=True)
  sizes = jnp.bincount(ids, length=num_slots + 1)[:num_slots].astype(jnp.int32)
  return order, sizes


def _ragged(x, slot_ids, p: ExpertParams):
  order, sizes = ragged_groups(slot_ids, p.w_gate.shape[0])
  xs = x[order]
  h = jax.nn.silu(jax.lax.ragged_dot(xs, p.w_gate, sizes)) * jax.lax.ragged_dot(xs, p.w_up, sizes)
  ys = jax.lax.ragged_dot(h, p.w_down, sizes)
  out = jnp.zeros_like(x).at[order].set(ys)
  # Rows past the last group are zeros in ragged_dot's definition; masking does not rely on a
  # backend keeping to it.
  return jnp.where((slot_ids >= 0)[:, None], out, 0)


def _capacity(x, slot_ids, p: ExpertParams, capacity_factor: float):
  num_tokens, num_slots = x.shape[0], p.w_gate.shape[0]
  ids = jnp.where(slot_ids >= 0, slot_ids, num_slots)  # padding sorts last, into no buffer
  order = jnp.argsort(ids, stable=True)
  sorted_ids = ids[order]
  counts = jnp.bincount(ids, length=num_slots + 1)
  starts = jnp.cumsum(counts) - counts
  rank = jnp.arange(num_tokens) - starts[sorted_ids]  # position inside its slot's group
  xs = x[order]

  def run(capacity: int):
    dest = jnp.where((sorted_ids < num_slots) & (rank < capacity),
                     sorted_ids * capacity + rank, num_slots * capacity)
    buf = jnp.zeros((num_slots * capacity, x.shape[1]), x.dtype).at[dest].set(xs, mode="drop")
    buf = buf.reshape(num_slots, capacity, -1)
    h = jax.nn.silu(jnp.einsum("ECD,EDF->ECF", buf, p.w_gate))
    h = h * jnp.einsum("ECD,EDF->ECF", buf, p.w_up)
    y = jnp.einsum("ECF,EFD->ECD", h, p.w_down).reshape(num_slots * capacity, -1)
    ys = y.at[dest].get(mode="fill", fill_value=0)
    return jnp.zeros_like(x).at[order].set(ys)

  capacity = min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens / num_slots)))
  if capacity >= num_tokens:
    return run(num_tokens)
  overflow = jnp.max(counts[:num_slots]) > capacity
  return jax.lax.cond(overflow, lambda: run(num_tokens), lambda: run(capacity))
