"""Greedy, temperature and top-p sampling with per-request PRNG streams.

A request's key for its i-th generated token is fold_in(request_key, i), so its samples do not
depend on which batch, slot or worker it runs in: a request moved to another worker after a
failure keeps drawing the same stream. Legend: B rows, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

# jax.random.key converts a seed to int64: a larger one raises a bare OverflowError ("Python int
# too large to convert to C long") when the request's key is made. With x64 off, as here, it keeps
# only the low 32 bits, so seeds s and s + 2**32 draw the same stream.
SEED_RANGE = (-(2**63), 2**63)  # [lo, hi)


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request sampling settings. temperature 0 is greedy.

  Attributes:
    temperature: a finite real >= 0; 0 = greedy.
    top_p: a real in (0, 1]; 1 keeps the whole vocabulary.
    seed: an int in [-2**63, 2**63), the range jax.random.key accepts. Without jax_enable_x64
      only `seed % 2**32` matters.
  """

  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not _is_real(self.temperature):
      raise ValueError(f"SamplingParams: temperature={self.temperature!r} must be a real number "
                       ">= 0 (0 = greedy)")
    if not 0 <= self.temperature < math.inf:
      raise ValueError(f"SamplingParams: temperature={self.temperature} must be finite and >= 0 "
                       "(0 = greedy)")
    if not _is_real(self.top_p):
      raise ValueError(f"SamplingParams: top_p={self.top_p!r} must be a real number in (0, 1]")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingParams: top_p={self.top_p} must be in (0, 1]")
    if not _is_int(self.seed):
      raise ValueError(f"SamplingParams: seed={self.seed!r} must be an int")
    lo, hi = SEED_RANGE
    if not lo <= int(self.seed) < hi:
      raise ValueError(f"SamplingParams: seed={self.seed} is outside [-2**63, 2**63), the seeds "
                       "jax.random.key accepts")

  def key_data(self) -> np.ndarray:
    """The request's raw PRNG key, u32[2]."""
    return np.asarray(jax.random.key_data(jax.random.key(self.seed)))


def _sample_row(logits, key_data, step, temperature, top_p):
  key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
  greedy = jnp.argmax(logits).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-scaled)
  probs = jax.nn.softmax(scaled[order])
  keep = (jnp.cumsum(probs) - probs) < top_p  # always keeps the most likely token
  masked = jnp.where(keep, scaled[order], -jnp.inf)
  drawn = order[jax.random.categorical(key, masked)].astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


@jax.jit
def sample(logits, key_data, step, temperature, top_p):
  """Samples one token per row.

  Args:
    logits: f32[B, V].
    key_data: u32[B, 2] raw request keys (SamplingParams.key_data()).
    step: i32[B] index of the token being generated in its request.
    temperature: f32[B] (0 = greedy); top_p: f32[B] in (0, 1].
  Returns:
    i32[B] tokens.
  """
  # An all-greedy batch skips the sort and the draws (a vocabulary-sized sort per row, the
  # dearest part of sampling): `cond` runs one branch.
  return jax.lax.cond(jnp.any(temperature > 0),
                      lambda: jax.vmap(_sample_row)(logits, key_data, step, temperature, top_p),
                      lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))
