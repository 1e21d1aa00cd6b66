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


@pytest.mark.parametrize("kernel", ["ragged", "capacity"])
def test_bf16_on_the_gpu_follows_f32_on_the_cpu(kernel):
  """bf16 weights and activations (f32 accumulation in attention scores, router and logits)
  stay within bf16's rounding of the f32 model, with either expert kernel."""
  params = tj.init_params(CFG, jax.random.key(1))
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (4, 16)).astype(np.int32)
  with jax.default_device(jax.devices("cpu")[0]):
    want = np.asarray(tj.forward(jax.device_put(params, jax.devices("cpu")[0]), CFG, tokens))
  cfg = CFG.replace(dtype="bfloat16", expert_kernel=kernel)
  gpu = _gpus()[0]
  with jax.default_device(gpu):
    p = jax.device_put(jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), params), gpu)
    got = tj.forward(p, cfg, jax.device_put(tokens, gpu))
  assert got.dtype == jax.numpy.float32  # logits come out of an f32-accumulated dot
  # On CPU the same comparison gives a mean |error| of 0.0075 on logits of mean magnitude 0.8
  # and 97 % of argmaxes equal: bf16's 8-bit mantissa, not a defect, bounds the rest.
  err = np.abs(np.asarray(got) - want)
  assert err.mean() < 0.03 * np.abs(want).mean() and err.max() < 0.2 * np.abs(want).max()
  assert (np.asarray(got).argmax(-1) == want.argmax(-1)).mean() > 0.9
