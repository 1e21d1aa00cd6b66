"""The model as a flax `nnx.Module`, for training and eval code written with flax.

`MoETransformer` holds the same parameter pytree as the rest of the library, one `nnx.Param`
per weight, and calls the same pure functions (`forward`, `extend`): its logits are
`forward`'s. Each Param carries its weight's logical axes (`out_sharding`, e.g. ("layers",
"experts", "embed", "expert_hidden")), so a flax user's logical-axis rules shard it as they
shard their own modules:

  model = MoETransformer.from_hf("path/to/checkpoint", dtype="bfloat16")
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  shardings = flax.linen.logical_to_mesh_sharding(specs, mesh, rules)

Training is the usual nnx loop (`nnx.Optimizer(model, optax.adamw(...), wrt=nnx.Param)`,
`nnx.value_and_grad`, `nnx.jit`); `model.params()` gives the plain `ModelParams` back, e.g. for
`save_checkpoint` or an `Engine`.
"""

from __future__ import annotations

import jax
from flax import nnx

from tarragon_jax.config import ModelConfig
from tarragon_jax.hf_import import load_hf_checkpoint
from tarragon_jax.layers.kv_cache import KVCache
from tarragon_jax.layers.params import ModelParams, init_params, logical_axes
from tarragon_jax.layers.transformer import extend, forward


def _names(params: ModelParams) -> list[str]:
  """Each weight's path, e.g. "layers.moe.experts.w_gate" (the keys of the module's state)."""
  return [jax.tree_util.keystr(path, simple=True, separator=".")
          for path, _ in jax.tree_util.tree_leaves_with_path(params)]


class MoETransformer(nnx.Module):
  """The MoE decoder of `config` as an nnx Module; see the module docstring.

  Args:
    config: the model's architecture.
    rngs: draws random weights (`init_params`) when `params` is not given.
    params: the weights to hold (e.g. from `load_checkpoint`); not copied.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None,
               params: ModelParams | None = None):
    if params is None:
      if rngs is None:
        raise ValueError("MoETransformer: give `params`, or `rngs` to draw random ones")
      params = init_params(config, rngs.params())
    self.config = config
    leaves, self._treedef = jax.tree.flatten(params)
    self._names = tuple(_names(params))  # in the tree's order (nnx keeps state sorted by name)
    axes = jax.tree.leaves(logical_axes(config), is_leaf=lambda x: isinstance(x, tuple))
    # eager_sharding=False: the axes are names for the user's rules, not a request to shard
    # now (which would need a mesh in context).
    self.weights = nnx.Dict({name: nnx.Param(leaf, out_sharding=ax, eager_sharding=False)
                             for name, leaf, ax in zip(self._names, leaves, axes, strict=True)})

  @classmethod
  def from_hf(cls, path: str, **kwargs) -> MoETransformer:
    """From a Hugging Face checkpoint; `kwargs` as `load_hf_checkpoint` takes them (dtype,
    shardings, max_seq_len, expert_kernel)."""
    config, params = load_hf_checkpoint(path, **kwargs)
    return cls(config, params=params)

  def params(self) -> ModelParams:
    """The weights as the library's `ModelParams` (the Params' current values)."""
    return jax.tree.unflatten(self._treedef, [self.weights[n][...] for n in self._names])

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """i32[B, T] -> f32[B, T, V] logits (`forward`)."""
    return forward(self.params(), self.config, tokens)

  def extend(self, cache: KVCache, tokens, slots, n_new) -> tuple[jax.Array, KVCache]:
    """Prefill or decode over a slot KV cache (`extend`): (f32[B, V] logits, cache)."""
    return extend(self.params(), self.config, cache, tokens, slots, n_new)
