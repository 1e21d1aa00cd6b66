"""A worker's part of an orbax checkpoint: what an AW or an EW serves, and nothing else.

An AW serves every weight but the routed experts; an EW serves its expert slots, [L, S] (its
primaries and shadows). At real sizes the routed experts are most of the model (Mixtral-8x7B:
~91 of ~93 GB), so a worker that restored the whole checkpoint and dropped what it does not
serve would need the whole model in its device's memory, once per worker. Orbax restores whole
leaves; these functions read with tensorstore (orbax's storage layer) through orbax's own read
spec, and `save_checkpoint` writes each (layer, expert) matrix as a chunk of its own, so an EW
reads its experts' chunks and no others. (A checkpoint written before experts were chunked
reads correctly too, a whole chunk at a time.)

The fingerprint the caller expects is checked against the checkpoint's before anything is read.
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import type_handlers

from tarragon_jax.checkpoint import check_fingerprint, checkpoint_config, latest_step
from tarragon_jax.layers.params import ExpertParams, ModelParams, abstract_params, without_experts


class _Leaves:
  """The params of one checkpoint step, leaf by leaf, as tensorstore arrays."""

  def __init__(self, directory: str, step: int | None, expect: str | None):
    directory = os.path.abspath(directory)
    if expect is not None:
      check_fingerprint(directory, expect, step)
    step = latest_step(directory) if step is None else step
    self.config = checkpoint_config(directory, step)
    abstract = abstract_params(self.config)
    # Each weight's name in the checkpoint, in a ModelParams tree (absent weights: None).
    self.names = jax.tree.map(lambda a, name: None if a is None else name, abstract,
                              ocp.tree.get_param_names(abstract), is_leaf=lambda a: a is None)
    self._dir = pathlib.Path(directory, str(step), "params")
    self._ocdbt = type_handlers.is_ocdbt_checkpoint(self._dir)
    self._context = ts.Context({"cache_pool#ocdbt": {}})  # (no cache: each chunk is read once)

  def open(self, name: str) -> ts.TensorStore:
    """The saved array `name` (zarr v2, or zarr v3 where orbax wrote that)."""
    errors = []
    for zarr3 in (False, True):
      info = type_handlers.ParamInfo(name=name, parent_dir=self._dir,
                                     is_ocdbt_checkpoint=self._ocdbt, use_zarr3=zarr3,
                                     ts_context=self._context)
      try:
        return ts.open(type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt),
                       context=self._context, open=True).result()
      except ValueError as err:
        errors.append(str(err))
    raise ValueError(f"{self._dir}: no array {name!r} in the checkpoint ({'; '.join(errors)})")


def load_attention(directory: str, step: int | None = None,
                   expect: str | None = None) -> ModelParams:
  """Every weight but the routed experts (which are None), as host arrays: an AW's part.

  Raises:
    ValueError: `expect` is given and the checkpoint holds other weights (nothing is read).
  """
  leaves = _Leaves(directory, step, expect)
  names = without_experts(leaves.names)
  reads = [leaves.open(n).read() for n in jax.tree.leaves(names)]  # (issued together)
  return jax.tree.unflatten(jax.tree.structure(names), [np.asarray(r.result()) for r in reads])


def load_experts(directory: str, contents: np.ndarray, step: int | None = None,
                 expect: str | None = None) -> ExpertParams:
  """The experts of slots `contents` (i32[L, S]: the logical expert in each slot of each layer,
  -1 for an empty slot, which is zeros), [L, S, ...] host arrays: an EW's part.

  Raises:
    ValueError: `expect` is given and the checkpoint holds other weights (nothing is read).
  """
  leaves = _Leaves(directory, step, expect)
  contents = np.asarray(contents)
  held = [(layer, s, int(e)) for (layer, s), e in np.ndenumerate(contents) if e >= 0]
  names = leaves.names.layers.moe.experts

  def read(name: str) -> np.ndarray:
    saved = leaves.open(name)
    out = np.zeros(contents.shape + tuple(saved.shape[2:]), saved.dtype.numpy_dtype)
    reads = [saved[layer, e].read() for layer, _, e in held]  # (issued together)
    for (layer, s, _), r in zip(held, reads):
      out[layer, s] = r.result()
    return out

  return ExpertParams(read(names.w_gate), read(names.w_up), read(names.w_down))
