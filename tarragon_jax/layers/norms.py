"""RMSNorm and rotary position embeddings (HF's non-interleaved "rotate half" layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, computed in f32 and cast back to x's dtype.

  Args:
    x: [..., D] activations.
    weight: [D] scale.
    eps: added to the mean square.
  """
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * xf).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of HF's default rope type.

  Args:
    x: [B, T, heads, H] queries or keys.
    positions: i32[B, T] absolute token positions.
    theta: the rope base (`rope_theta`).
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([freqs, freqs], -1))[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)
