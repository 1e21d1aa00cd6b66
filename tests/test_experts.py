"""The fast expert kernels ("capacity", "ragged") against the obvious "loop" reference.

Legend: M tokens, D model, E experts, F expert hidden.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tarragon_jax as tj
from tarragon_jax.layers.experts import ragged_groups
from tarragon_jax.layers.params import ExpertParams
from tests.hf_models import random_params

TOL = 1e-5  # max |kernel - loop| on O(1) outputs, f32
GRAD_TOL = 1e-5  # max |grad(kernel) - grad(loop)| per weight, f32; grads are O(0.1)

M, D, E, F = 24, 16, 8, 12
FAST_KERNELS = ["capacity", "ragged"]


@functools.partial(jax.jit, static_argnames=("kernel", "capacity_factor"))
def _ffn(x, ids, p, kernel, capacity_factor=2.0):
  return tj.expert_ffn(x, ids, p, kernel, capacity_factor)


@pytest.fixture(scope="module")
def experts():
  rng = np.random.default_rng(0)
  p = ExpertParams(
      w_gate=jnp.asarray(rng.normal(0, D ** -0.5, (E, D, F)), jnp.float32),
      w_up=jnp.asarray(rng.normal(0, D ** -0.5, (E, D, F)), jnp.float32),
      w_down=jnp.asarray(rng.normal(0, F ** -0.5, (E, F, D)), jnp.float32),
  )
  x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  return x, p


def _numpy_reference(x, ids, p):
  """Token by token: SwiGLU of the token's expert, zeros for padding (-1)."""
  x, ids = np.asarray(x, np.float64), np.asarray(ids)
  out = np.zeros_like(x)
  for m, e in enumerate(ids):
    if e < 0:
      continue
    g = x[m] @ np.asarray(p.w_gate[e], np.float64)
    u = x[m] @ np.asarray(p.w_up[e], np.float64)
    out[m] = (g / (1 + np.exp(-g)) * u) @ np.asarray(p.w_down[e], np.float64)
  return out


def _ids(rng, kind: str) -> np.ndarray:
  if kind == "random":
    return rng.integers(0, E, M)
  if kind == "random+padding":
    ids = rng.integers(0, E, M)
    ids[rng.random(M) < 0.3] = -1
    return ids
  if kind == "balanced":  # 3 tokens per expert: fits the capacity of 6, no overflow branch
    return np.arange(M) % E
  if kind == "all-to-one":  # 24 tokens into one expert of capacity ceil(2 * 24 / 8) = 6
    return np.full(M, 5)
  if kind == "two-of-eight":  # six experts get nothing
    return rng.choice([1, 6], M)
  if kind == "all-padding":
    return np.full(M, -1)
  raise ValueError(kind)


ID_KINDS = ["balanced", "random", "random+padding", "all-to-one", "two-of-eight", "all-padding"]


@pytest.mark.parametrize("kind", ID_KINDS)
def test_loop_matches_token_by_token_numpy(experts, kind):
  x, p = experts
  ids = _ids(np.random.default_rng(1), kind)
  out = _ffn(x, jnp.asarray(ids, jnp.int32), p, "loop")
  np.testing.assert_allclose(np.asarray(out), _numpy_reference(x, ids, p), rtol=0, atol=TOL)


# capacity per expert = min(M, ceil(factor * M / E)): 6 of 24 tokens (overflows when one expert
# gets more than 6), 1 (nearly always overflows), 24 (never).
KERNEL_SETTINGS = [("capacity", 2.0), ("capacity", 0.1), ("capacity", 8.0), ("ragged", 2.0)]


@pytest.mark.parametrize("kind", ID_KINDS)
@pytest.mark.parametrize("kernel,capacity_factor", KERNEL_SETTINGS)
def test_kernel_matches_loop(experts, kernel, capacity_factor, kind):
  """Every token gets its expert's output, whatever the capacity; padding gets exact zeros."""
  x, p = experts
  ids = _ids(np.random.default_rng(1), kind)
  ids_j = jnp.asarray(ids, jnp.int32)
  want = np.asarray(_ffn(x, ids_j, p, "loop"))
  got = np.asarray(_ffn(x, ids_j, p, kernel, capacity_factor))
  assert got.shape == (M, D) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
  np.testing.assert_array_equal(got[ids < 0], 0.0)
  # No token is dropped: every real token's output is nonzero.
  assert np.all(np.abs(got[ids >= 0]).sum(-1) > 0)


@pytest.mark.parametrize("load_tokens", [6, 1])
def test_capacity_sized_for_the_real_load_still_drops_nothing(experts, load_tokens):
  """Mostly-padding input with capacity sized for `load_tokens` real tokens: still exact."""
  x, p = experts
  ids = np.full(M, -1)
  ids[[0, 3, 4, 9, 17, 23]] = [2, 2, 2, 5, 0, 2]  # 6 real tokens, 4 of them in expert 2
  ids_j = jnp.asarray(ids, jnp.int32)
  got = tj.expert_ffn(x, ids_j, p, "capacity", load_tokens=load_tokens)
  np.testing.assert_allclose(np.asarray(got), _numpy_reference(x, ids, p), rtol=0, atol=TOL)
  np.testing.assert_array_equal(np.asarray(got)[ids < 0], 0.0)


def test_auto_kernel_is_capacity_on_cpu(experts):
  x, p = experts
  ids = jnp.asarray(_ids(np.random.default_rng(2), "random+padding"), jnp.int32)
  np.testing.assert_array_equal(np.asarray(_ffn(x, ids, p, "auto")),
                                np.asarray(_ffn(x, ids, p, "capacity")))


def test_unknown_kernel_is_named(experts):
  x, p = experts
  with pytest.raises(ValueError, match="'dense'"):
    tj.expert_ffn(x, jnp.zeros((M,), jnp.int32), p, "dense")


# End to end: the model is differentiable through every kernel, with the same gradients.

GRAD_CONFIG = tj.ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=8, num_experts=4, top_k=2,
                             expert_hidden=16, max_seq_len=8, capacity_factor=1.0)


@functools.partial(jax.jit, static_argnames="cfg")
@jax.value_and_grad
def _loss_and_grad(params, cfg, tokens):
  logits = tj.forward(params, cfg, tokens[:, :-1])
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@pytest.fixture(scope="module")
def grads():
  params = random_params(GRAD_CONFIG, seed=0)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, GRAD_CONFIG.vocab_size)
  out = {}
  for kernel in ["loop", *FAST_KERNELS]:
    cfg = GRAD_CONFIG.replace(expert_kernel=kernel)
    out[kernel] = _loss_and_grad(params, cfg, tokens)
  return out


@pytest.mark.parametrize("kernel", ["loop", *FAST_KERNELS])
def test_grad_through_forward_is_finite_and_reaches_every_weight(grads, kernel):
  loss, g = grads[kernel]
  assert np.isfinite(float(loss))
  for path, leaf in jax.tree_util.tree_leaves_with_path(g):
    leaf = np.asarray(leaf)
    assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
    assert np.any(leaf != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_grad_matches_loop_kernel(grads, kernel):
  loss, g = grads[kernel]
  loop_loss, loop_g = grads["loop"]
  assert abs(float(loss) - float(loop_loss)) <= TOL
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(loop_g),
                          strict=True):
    assert float(jnp.max(jnp.abs(a - b))) <= GRAD_TOL, jax.tree_util.keystr(path)


def test_ragged_kernel_leaves_padding_out_of_every_group(experts, monkeypatch):
  """An EW's buffers are mostly padding: the ragged kernel multiplies real rows only."""
  x, p = experts
  ids = np.full(M, -1)
  ids[[3, 7, 8, 20]] = [5, 0, 5, 2]  # 4 real rows among 24, padding before and after them
  order, sizes = ragged_groups(jnp.asarray(ids), E)
  assert np.asarray(sizes).tolist() == [1, 0, 1, 0, 0, 2, 0, 0]
  assert np.asarray(order)[:4].tolist() == [7, 20, 3, 8]  # real rows first, by slot
  seen = []
  real_ragged_dot = jax.lax.ragged_dot

  def spy(lhs, rhs, group_sizes, **kw):
    seen.append(int(np.sum(group_sizes)))
    return real_ragged_dot(lhs, rhs, group_sizes, **kw)

  monkeypatch.setattr(jax.lax, "ragged_dot", spy)
  out = tj.expert_ffn(x, jnp.asarray(ids), p, "ragged")  # eager: the spy sees concrete sizes
  assert seen == [4, 4, 4]  # gate, up, down: 4 rows each, none of the 20 padding rows
  np.testing.assert_allclose(out, _numpy_reference(x, ids, p), atol=TOL)
