"""The single-device reference: the co-located model generating greedily, request by request.

Engine outputs are checked against this (greedy tokens must be identical).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.kv_cache import KVCache
from tarragon_jax.layers.params import ModelParams
from tarragon_jax.layers.transformer import extend
from tarragon_jax.worker.buckets import bucket


def reference_greedy(params: ModelParams, cfg: ModelConfig, prompts: Iterable[Sequence[int]],
                     max_new_tokens: int | Sequence[int], stop_tokens: Sequence[int] = (),
                     device=None) -> list[list[int]]:
  """Greedy outputs of each prompt, one request at a time on one device.

  Args:
    prompts: token id sequences.
    max_new_tokens: one limit for all, or one per prompt.
    stop_tokens: generation of a request ends after it emits one of these.
    device: where to run (default: the first device).
  """
  device = device or jax.devices()[0]
  params = jax.device_put(params, device)
  prompts = [list(p) for p in prompts]
  limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
            else list(max_new_tokens))
  outputs = []
  one = jnp.ones((1,), jnp.int32)
  slot = jnp.zeros((1,), jnp.int32)
  for prompt, limit in zip(prompts, limits):
    cache = jax.device_put(KVCache.create(cfg, 1), device)
    # One compile per power-of-two bucket, not per prompt length.
    padded = np.zeros((1, bucket(len(prompt), 1, cfg.max_seq_len)), np.int32)
    padded[0, :len(prompt)] = prompt
    logits, cache = extend(params, cfg, cache, jnp.asarray(padded), slot,
                           jnp.asarray([len(prompt)], jnp.int32))
    out: list[int] = []
    while True:
      token = int(np.argmax(np.asarray(logits[0])))
      out.append(token)
      if len(out) >= limit or token in stop_tokens:
        break
      logits, cache = extend(params, cfg, cache, jnp.asarray([[token]], jnp.int32), slot, one)
    outputs.append(out)
  return outputs
