"""The persistent compilation cache every worker (and the launchers) share."""

from __future__ import annotations

import os

import jax

DEFAULT_COMPILE_CACHE = os.environ.get("TARRAGON_JAX_CACHE", "/tmp/tarragon_jax_compile_cache")


def enable_compile_cache(path: str | None):
  """Persists every compiled executable under `path` (None or '' leaves caching off).

  Each worker cell compiles its own executables; a warm cache turns those compiles into loads,
  an order of magnitude faster.
  """
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
