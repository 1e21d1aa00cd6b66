"""GPU checks (`pytest -m gpu`, run by scripts/device_check.sh on a GPU host; skipped without).

The model on the GPU against the CPU, and worker processes on the GPU (sharing it when the host
has fewer GPUs than workers) surviving a SIGKILL with the tokens of their fault-free run.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import tarragon_jax as tj
from tarragon_jax.runtime.remote import ProcessRuntime
from tarragon_jax.runtime.spawner import LocalSpawner
from tests.test_process_runtime import CFG, _serve


def _gpus() -> list:
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpus(), reason="no GPU")]


def test_the_model_on_the_gpu_matches_the_cpu():
  params = tj.init_params(CFG, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
  out = {}
  for name, device in (("gpu", _gpus()[0]), ("cpu", jax.devices("cpu")[0])):
    with jax.default_device(device):
      p = jax.device_put(params, device)
      out[name] = np.asarray(tj.forward(p, CFG, jax.device_put(tokens, device)))
  np.testing.assert_allclose(out["gpu"], out["cpu"], atol=2e-3, rtol=2e-3)


def test_worker_processes_on_the_gpu_survive_a_kill():
  runtime = lambda: ProcessRuntime(LocalSpawner(6, "cuda", devices=len(_gpus())))  # noqa: E731
  clean = _serve(runtime())
  faulty = _serve(runtime(), "kill:ew1@step=4,layer=1; kill:aw0@step=7")
  assert faulty.outputs == clean.outputs
  assert {ev["worker"] for ev in faulty.timeline.of("declared_failed")} == {"ew1", "aw0"}
