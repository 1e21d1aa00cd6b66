"""Parameter pytrees, declared once.

Every weight's shape, logical axes and init scale live in `param_specs`; random init, the
logical-axes tree (for shardings) and orbax restore targets are all derived from it.

Legend: L layers, V vocab, D model, N q heads, K kv heads, H head dim, E experts,
F expert hidden, G shared-expert hidden.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tarragon_jax.config import ModelConfig


def _pytree(cls):
  """Frozen dataclass registered as a pytree; every field is a child (None fields are empty)."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  fields = [f.name for f in dataclasses.fields(cls)]
  return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_pytree
class AttentionParams:
  wq: Any  # [L, D, N, H]
  wk: Any  # [L, D, K, H]
  wv: Any  # [L, D, K, H]
  wo: Any  # [L, N, H, D]
  bq: Any = None  # [L, N, H]  (attention_bias)
  bk: Any = None  # [L, K, H]
  bv: Any = None  # [L, K, H]
  q_norm: Any = None  # [L, H]  (qk_norm)
  k_norm: Any = None  # [L, H]


@_pytree
class SharedExpertParams:
  w_gate: Any  # [L, D, G]
  w_up: Any  # [L, D, G]
  w_down: Any  # [L, G, D]
  gate: Any  # [L, D]  sigmoid gate on the shared expert's output


@_pytree
class ExpertParams:
  """SwiGLU experts, stacked on a slot axis E (logical experts, or an EW's local slots)."""

  w_gate: Any  # [..., E, D, F]
  w_up: Any  # [..., E, D, F]
  w_down: Any  # [..., E, F, D]


@_pytree
class MoEParams:
  router: Any  # [L, D, E]
  experts: ExpertParams  # [L, E, ...]
  shared: SharedExpertParams | None = None


@_pytree
class LayerParams:
  """All decoder layers, stacked on a leading L axis (scanned over, or sliced per layer)."""

  attn_norm: Any  # [L, D]
  attn: AttentionParams
  mlp_norm: Any  # [L, D]
  moe: MoEParams


@_pytree
class ModelParams:
  embed: Any  # [V, D]
  layers: LayerParams
  final_norm: Any  # [D]
  lm_head: Any  # [D, V]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """Declaration of one weight: shape, logical axis names and how to initialize it."""

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: str = "normal"  # "normal" (fan-in scaled) | "ones" | "zeros"
  fan_in: int = 1


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def param_specs(cfg: ModelConfig) -> ModelParams:
  """The single declaration of every weight of `cfg`'s model (a ModelParams of ParamSpecs)."""
  L, V, D = cfg.num_layers, cfg.vocab_size, cfg.hidden_size
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  E, F, G = cfg.num_experts, cfg.expert_hidden, cfg.shared_expert_hidden

  def w(shape, axes, fan_in):
    return ParamSpec(tuple(shape), tuple(axes), "normal", fan_in)

  def ones(shape, axes):
    return ParamSpec(tuple(shape), tuple(axes), "ones")

  def zeros(shape, axes):
    return ParamSpec(tuple(shape), tuple(axes), "zeros")

  attn = AttentionParams(
      wq=w((L, D, N, H), ("layers", "embed", "q_heads", "head_dim"), D),
      wk=w((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), D),
      wv=w((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), D),
      wo=w((L, N, H, D), ("layers", "q_heads", "head_dim", "embed"), N * H),
      bq=zeros((L, N, H), ("layers", "q_heads", "head_dim")) if cfg.attention_bias else None,
      bk=zeros((L, K, H), ("layers", "kv_heads", "head_dim")) if cfg.attention_bias else None,
      bv=zeros((L, K, H), ("layers", "kv_heads", "head_dim")) if cfg.attention_bias else None,
      q_norm=ones((L, H), ("layers", "head_dim")) if cfg.qk_norm else None,
      k_norm=ones((L, H), ("layers", "head_dim")) if cfg.qk_norm else None,
  )
  shared = None
  if G:
    shared = SharedExpertParams(
        w_gate=w((L, D, G), ("layers", "embed", "shared_hidden"), D),
        w_up=w((L, D, G), ("layers", "embed", "shared_hidden"), D),
        w_down=w((L, G, D), ("layers", "shared_hidden", "embed"), G),
        gate=w((L, D), ("layers", "embed"), D),
    )
  moe = MoEParams(
      router=w((L, D, E), ("layers", "embed", "experts"), D),
      experts=ExpertParams(
          w_gate=w((L, E, D, F), ("layers", "experts", "embed", "expert_hidden"), D),
          w_up=w((L, E, D, F), ("layers", "experts", "embed", "expert_hidden"), D),
          w_down=w((L, E, F, D), ("layers", "experts", "expert_hidden", "embed"), F),
      ),
      shared=shared,
  )
  layers = LayerParams(
      attn_norm=ones((L, D), ("layers", "embed")),
      attn=attn,
      mlp_norm=ones((L, D), ("layers", "embed")),
      moe=moe,
  )
  return ModelParams(
      embed=w((V, D), ("vocab", "embed"), 1),
      layers=layers,
      final_norm=ones((D,), ("embed",)),
      lm_head=w((D, V), ("embed", "vocab"), D),
  )


def _map_specs(fn: Callable[[ParamSpec], Any], specs: ModelParams):
  return jax.tree.map(fn, specs, is_leaf=_is_spec)


def logical_axes(config: ModelConfig) -> ModelParams:
  """Tree of logical-axis tuples, one per weight, for building shardings."""
  return _map_specs(lambda s: s.axes, param_specs(config))


def abstract_params(cfg: ModelConfig, shardings=None) -> ModelParams:
  """Tree of ShapeDtypeStructs (an orbax restore target); `shardings` is a matching tree or None."""
  dtype = jnp.dtype(cfg.dtype)
  abstract = _map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg))
  if shardings is None:
    return abstract
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      abstract, shardings)


def without_experts(params: ModelParams) -> ModelParams:
  """`params` (any ModelParams-shaped tree) with the routed experts None: what an AW holds."""
  moe = dataclasses.replace(params.layers.moe, experts=None)
  return dataclasses.replace(params, layers=dataclasses.replace(params.layers, moe=moe))


def slot_index(contents) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(layers i32[L, 1], experts i32[L, S], held bool[L, S]) for slots `contents` (i32[L, S],
  -1: empty): `x[layers, experts]` gathers each slot's expert from a stack [L, E, ...] (an empty
  slot reads expert 0: mask it with `held`)."""
  contents = np.asarray(contents)
  held = contents >= 0
  return np.arange(contents.shape[0])[:, None], np.where(held, contents, 0), held


def slot_experts(experts: ExpertParams, contents) -> ExpertParams:
  """The experts in slots `contents` (i32[L, S]: the logical expert of each slot of each layer,
  -1: an empty slot, zeros), [L, S, ...]: gathered where the weights are (device arrays stay
  on their devices: at real sizes the model's experts never pass through host memory to build
  one EW), host arrays from host arrays."""
  layers, idx, held = slot_index(contents)

  def gather(w):
    xp = jnp if isinstance(w, jax.Array) else np
    return xp.where(held[:, :, None, None], w[layers, idx], 0).astype(w.dtype)

  return ExpertParams(gather(experts.w_gate), gather(experts.w_up), gather(experts.w_down))


def init_params(config: ModelConfig, key: jax.Array, scale: float = 1.0) -> ModelParams:
  """Seeded random parameters: normal(0, scale / sqrt(fan_in)) weights, unit norms, zero biases."""
  specs = param_specs(config)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  keys = jax.random.split(key, len(leaves))
  dtype = jnp.dtype(config.dtype)

  def make(spec: ParamSpec, k):
    if spec.init == "ones":
      return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
      return jnp.zeros(spec.shape, dtype)
    std = scale / math.sqrt(spec.fan_in)
    return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def layer_slice(tree, index):
  """The `index`-th layer of a tree stacked on a leading L axis (index may be traced)."""
  return jax.tree.map(lambda x: x[index], tree)
