"""Training the MoE end to end: a byte-level corpus, next-token loss, an optax step.

The model is differentiable through every expert kernel; this module is what
`experiments/train.py` runs and what a user's own training loop can reuse.
Legend: B batch, T window length, V vocab.
"""

from __future__ import annotations

import functools
import importlib
import os

import jax
import numpy as np
import optax

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.params import ModelParams, ParamSpec, param_specs
from tarragon_jax.layers.transformer import forward


def stdlib_bytes(packages: str) -> np.ndarray:
  """u8[n]: the .py sources of comma-separated stdlib packages, concatenated in sorted order."""
  chunks = []
  for name in packages.split(","):
    root = os.path.dirname(importlib.import_module(name.strip()).__file__)
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      for fname in sorted(filenames):
        if fname.endswith(".py"):
          with open(os.path.join(dirpath, fname), "rb") as f:
            chunks.append(f.read())
  return np.frombuffer(b"\n".join(chunks), np.uint8)


def windows(data: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
  """i32[len(starts), length + 1] windows of `data` (inputs plus the shifted targets)."""
  return data[starts[:, None] + np.arange(length + 1)].astype(np.int32)


def loss_fn(params, config: ModelConfig, batch: jax.Array) -> jax.Array:
  """Mean next-token cross entropy (nats) of batch i32[B, T + 1] through `forward`."""
  logits = forward(params, config, batch[:, :-1])  # f32[B, T, V]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


eval_loss = jax.jit(loss_fn, static_argnames="config")


def decay_mask(config: ModelConfig) -> ModelParams:
  """True for the weights weight decay applies to: the projections, experts, router,
  embedding and head; False for norm scales and biases (decaying a norm scale pulls it to 0,
  not to its initial 1)."""
  return jax.tree.map(lambda s: s.init == "normal", param_specs(config),
                      is_leaf=lambda x: isinstance(x, ParamSpec))


def adamw(config: ModelConfig, learning_rate: float, steps: int, warmup_steps: int,
          weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
  """AdamW with linear warmup, cosine decay, global-norm clipping, and weight decay on
  `decay_mask(config)` only."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                                max(steps, warmup_steps + 1))
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, weight_decay=weight_decay,
                                 mask=decay_mask(config)))


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation):
  """A jitted step(params, opt_state, batch) -> (params, opt_state, loss before the step).

  It compiles once per returned function (the config and the optimizer are closed over, not
  hashed per call). `params` and `opt_state` are donated: the arrays passed in are invalid
  after the call; use the ones it returns.
  """

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, config, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step
