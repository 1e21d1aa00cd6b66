"""Every test runs on the CPU platform with 8 devices (AW/EW cells are carved from them)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from tarragon_jax import launch_config  # noqa: E402

# Each worker cell compiles its own executables; keep them across test runs.
launch_config.enable_compile_cache(launch_config.DEFAULT_COMPILE_CACHE)
