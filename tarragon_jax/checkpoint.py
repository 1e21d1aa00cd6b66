"""Orbax checkpoints of model parameters and their config.

A checkpoint directory is an orbax `CheckpointManager` directory: each step holds the params
(`StandardSave`) and the ModelConfig as JSON, so `load_checkpoint` needs nothing but the path.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.params import ModelParams, abstract_params


def save_checkpoint(directory: str, params: ModelParams, config: ModelConfig, step: int = 0,
                    metadata: dict | None = None) -> str:
  """Saves params and config as `step` under `directory`; blocks until they are on disk.

  Returns:
    The path of the saved step.
  """
  directory = os.path.abspath(directory)
  with ocp.CheckpointManager(directory) as mgr:
    mgr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        config=ocp.args.JsonSave(config.to_dict()),
        metadata=ocp.args.JsonSave(metadata or {}),
    ))
    mgr.wait_until_finished()
  return os.path.join(directory, str(step))


def load_checkpoint(directory: str, step: int | None = None, shardings=None
                    ) -> tuple[ModelConfig, ModelParams]:
  """Restores (config, params) from a directory written by `save_checkpoint`.

  Args:
    directory: the checkpoint manager directory.
    step: which step; the latest when None.
    shardings: None (default device), one `jax.sharding.Sharding` for every weight, or a
      ModelParams-shaped tree of shardings; params are restored directly onto them.
  """
  directory = os.path.abspath(directory)
  with ocp.CheckpointManager(directory) as mgr:
    step = mgr.latest_step() if step is None else step
    if step is None or step not in mgr.all_steps():
      raise FileNotFoundError(f"{directory}: no checkpoint step {step}; steps: {mgr.all_steps()}")
    meta = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    config = ModelConfig.from_dict(dict(meta["config"]))
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, abstract_params(config))
    target = abstract_params(config, shardings)
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            target)
    restored = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  return config, restored["params"]
