"""The model on a user's mesh, whichever axis types it has: `jax.make_mesh` makes explicit axes
by default, and a user's own logical-axis rules must work there as on auto axes."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import tarragon_jax as tj

CFG = tj.ModelConfig(max_seq_len=32)
RULES = {"experts": "model", "q_heads": "model", "kv_heads": "model"}  # the user's rules


def _put(mesh, params, tokens):
  shardings = jax.tree.map(lambda axes: NamedSharding(mesh, P(*[RULES.get(a) for a in axes])),
                           tj.logical_axes(CFG), is_leaf=lambda x: isinstance(x, tuple))
  return (jax.device_put(params, shardings),
          jax.device_put(tokens, NamedSharding(mesh, P("data", None))))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_forward_and_extend_on_a_users_mesh_match_one_device(axis_type):
  params = tj.init_params(CFG, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 8)).astype(np.int32)
  want = np.asarray(tj.forward(params, CFG, tokens))
  cache = tj.KVCache.create(CFG, 4)
  slots, n_new = np.arange(4, dtype=np.int32), np.full(4, 8, np.int32)
  want_last, _ = tj.extend(params, CFG, cache, tokens, slots, n_new)

  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
  p, t = _put(mesh, params, tokens)
  with jax.set_mesh(mesh):
    got = tj.forward(p, CFG, t)
    cache = tj.KVCache.create(CFG, 4, sharding=NamedSharding(mesh, P()))
    last, cache = tj.extend(p, CFG, cache, t, slots, n_new)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(last), np.asarray(want_last), atol=1e-5)
  assert np.asarray(cache.lengths).tolist() == [8] * 4
  if axis_type == AxisType.Explicit:
    assert got.sharding.spec == P("data", None, None)
