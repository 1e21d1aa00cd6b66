"""tarragon_jax: resilient Mixture-of-Experts inference in JAX.

The public API. Model code is pure functions over parameter pytrees; see README.md for a tour.
The model API is imported with the package; the serving and training API on first use (so that
a model-only user never imports the serving stack: ZeroMQ, tensorstore, the runtimes).
"""

import importlib

from tarragon_jax.checkpoint import load_checkpoint, save_checkpoint
from tarragon_jax.config import ModelConfig
from tarragon_jax.hf_import import CheckpointError, load_hf_checkpoint
from tarragon_jax.layers.experts import expert_ffn
from tarragon_jax.layers.kv_cache import KVCache
from tarragon_jax.layers.params import ModelParams, init_params, logical_axes
from tarragon_jax.layers.sampling import SamplingParams, sample
from tarragon_jax.layers.transformer import extend, forward

# name -> the module it comes from, imported when the name is first used.
_ON_USE = {
    "Engine": "tarragon_jax.serving.engine",
    "EngineConfig": "tarragon_jax.serving.engine_config",
    "ResilienceConfig": "tarragon_jax.serving.engine_config",
    "RequestFailed": "tarragon_jax.serving.streams",
    "RequestsFailed": "tarragon_jax.serving.frontend",
    "TokenEvent": "tarragon_jax.serving.metrics",
    "Request": "tarragon_jax.worker.requests",
    "CellPlan": "tarragon_jax.mesh.cells",
    "DetectionConfig": "tarragon_jax.resilience.detector",
    "parse_faults": "tarragon_jax.resilience.faults",
    "RecoveryPolicy": "tarragon_jax.resilience.policy",
    "ProcessRuntime": "tarragon_jax.runtime.remote",
    "LocalSpawner": "tarragon_jax.runtime.spawner",
    "loss_fn": "tarragon_jax.training",
    "eval_loss": "tarragon_jax.training",
    "adamw": "tarragon_jax.training",
    "decay_mask": "tarragon_jax.training",
    "make_train_step": "tarragon_jax.training",
    "MoETransformer": "tarragon_jax.flax_nnx",
}


def __getattr__(name: str):
  if name in _ON_USE:
    value = getattr(importlib.import_module(_ON_USE[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'tarragon_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_ON_USE))


__all__ = [
    "CheckpointError",
    "KVCache",
    "ModelConfig",
    "ModelParams",
    "SamplingParams",
    "expert_ffn",
    "extend",
    "forward",
    "init_params",
    "load_checkpoint",
    "load_hf_checkpoint",
    "logical_axes",
    "sample",
    "save_checkpoint",
    *_ON_USE,
]
