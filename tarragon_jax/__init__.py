"""tarragon_jax: resilient Mixture-of-Experts inference in JAX.

The public API. Model code is pure functions over parameter pytrees; see README.md for a tour.
"""

from tarragon_jax.checkpoint import load_checkpoint, save_checkpoint
from tarragon_jax.config import ModelConfig
from tarragon_jax.hf_import import CheckpointError, load_hf_checkpoint
from tarragon_jax.layers.experts import expert_ffn
from tarragon_jax.layers.kv_cache import KVCache
from tarragon_jax.layers.params import ModelParams, init_params, logical_axes
from tarragon_jax.layers.sampling import SamplingParams, sample
from tarragon_jax.layers.transformer import extend, forward

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
]
