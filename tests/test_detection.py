"""The detection hook: a worker whose outputs do not arrive by the deadline is named."""

import jax.numpy as jnp
import pytest

from tarragon_jax.serving.engine import WorkerTimeout, await_outputs


class _Silent:
  """Stands in for a hung worker's output: it never becomes ready."""

  def is_ready(self) -> bool:
    return False


def test_ready_outputs_return_without_timeout():
  waited = await_outputs({"ew0": [jnp.ones(3)], "aw0": [jnp.zeros(2)]}, deadline_s=5.0)
  assert waited < 5.0


def test_silent_worker_is_named_after_the_deadline():
  with pytest.raises(WorkerTimeout) as err:
    await_outputs({"ew0": [jnp.ones(3)], "ew2": [_Silent()], "aw1": [_Silent()]}, deadline_s=0.02)
  assert err.value.silent == ["aw1", "ew2"]
