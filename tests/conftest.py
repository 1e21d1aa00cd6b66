"""Every test runs on the CPU platform with 8 devices (AW/EW cells are carved from them)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Compiled executables persist across test processes and runs (one per device per function
# here, since every worker cell compiles its own): a warm cache turns ~25 s of compiles per
# engine shape into ~2 s.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("TARRAGON_JAX_CACHE", "/tmp/tarragon_jax_compile_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
