"""Greedy, temperature and top-p sampling with per-request PRNG streams."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import tarragon_jax as tj

V = 32
FREQ_TOL = 0.03  # |empirical - expected| token frequency over 4000 draws (~5 standard errors)


def _sample(logits, params: list[tj.SamplingParams], steps):
  """Samples one token per row; row b follows params[b] at its step steps[b]."""
  return np.asarray(tj.sample(
      jnp.asarray(logits, jnp.float32),
      jnp.asarray(np.stack([p.key_data() for p in params])),
      jnp.asarray(steps, jnp.int32),
      jnp.asarray([p.temperature for p in params], jnp.float32),
      jnp.asarray([p.top_p for p in params], jnp.float32),
  ))


def test_greedy_is_argmax():
  logits = np.random.default_rng(0).normal(size=(6, V)).astype(np.float32)
  params = [tj.SamplingParams(seed=s) for s in range(6)]
  for step in (0, 7):
    tokens = _sample(logits, params, [step] * 6)
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, np.argmax(logits, -1))


def test_greedy_rows_of_a_sampled_batch_are_argmax():
  """A batch with any sampled row takes the sampling branch; its greedy rows stay argmax."""
  logits = np.random.default_rng(3).normal(size=(4, V)).astype(np.float32)
  params = [tj.SamplingParams(temperature=t, seed=s) for s, t in enumerate((0.0, 0.8, 0.0, 5.0))]
  for step in range(6):
    tokens = _sample(logits, params, [step] * 4)
    np.testing.assert_array_equal(tokens[[0, 2]], np.argmax(logits, -1)[[0, 2]])
    alone = [_sample(logits[r:r + 1], [params[r]], [step])[0] for r in (1, 3)]
    np.testing.assert_array_equal(tokens[[1, 3]], alone)


def test_tiny_top_p_is_argmax_at_any_temperature():
  logits = np.random.default_rng(1).normal(size=(4, V)).astype(np.float32)
  for step in range(5):
    params = [tj.SamplingParams(temperature=t, top_p=1e-6, seed=step) for t in (0.5, 1, 2, 10)]
    np.testing.assert_array_equal(_sample(logits, params, [step] * 4), np.argmax(logits, -1))


def test_request_samples_do_not_depend_on_batch_or_row():
  """A request draws the same tokens alone as row 0 or as row 3 of a batch of 5."""
  rng = np.random.default_rng(2)
  mine = tj.SamplingParams(temperature=0.9, top_p=0.95, seed=42)
  my_logits = rng.normal(size=V).astype(np.float32)
  others = [tj.SamplingParams(temperature=t, top_p=p, seed=s)
            for t, p, s in [(1.0, 1.0, 42), (0.0, 1.0, 7), (2.0, 0.5, 3), (0.7, 0.9, 43)]]
  alone, batched = [], []
  for step in range(24):
    alone.append(_sample(my_logits[None], [mine], [step])[0])
    logits = rng.normal(size=(5, V)).astype(np.float32)
    logits[3] = my_logits
    params = others[:3] + [mine] + others[3:]
    steps = [step + 5, 0, step, step, 100 - step]  # other rows are at other steps
    batched.append(_sample(logits, params, steps)[3])
  np.testing.assert_array_equal(alone, batched)
  assert len(set(alone)) > 1  # the stream is not stuck on one token


def test_draws_vary_with_step_and_repeat_for_the_same_step():
  flat = np.zeros((1, V), np.float32)
  p = tj.SamplingParams(temperature=1.0, seed=5)
  draws = [_sample(flat, [p], [step])[0] for step in range(40)]
  assert len(set(draws)) >= 10  # 40 uniform draws over 32 tokens
  again = [_sample(flat, [p], [step])[0] for step in range(40)]
  assert draws == again
  other_seed = [_sample(flat, [tj.SamplingParams(temperature=1.0, seed=6)], [s])[0]
                for s in range(40)]
  assert draws != other_seed


def test_frequencies_follow_softmax_and_top_p_cuts_the_tail():
  probs = np.array([0.7, 0.2, 0.1] + [0.0] * (V - 3))
  logits = np.log(np.maximum(probs, 1e-30)).astype(np.float32)
  n = 4000
  full = _sample(np.tile(logits, (n, 1)), [tj.SamplingParams(temperature=1.0, seed=9)] * n,
                 np.arange(n))
  freq = np.bincount(full, minlength=V) / n
  np.testing.assert_allclose(freq[:3], probs[:3], atol=FREQ_TOL)
  assert freq[3:].sum() == 0
  # top_p = 0.75 keeps tokens 0 and 1 (mass before them 0 and 0.7 < 0.75) and never token 2.
  cut = _sample(np.tile(logits, (n, 1)),
                [tj.SamplingParams(temperature=1.0, top_p=0.75, seed=9)] * n, np.arange(n))
  freq = np.bincount(cut, minlength=V) / n
  assert freq[2:].sum() == 0
  np.testing.assert_allclose(freq[:2], [0.7 / 0.9, 0.2 / 0.9], atol=FREQ_TOL)


def test_key_data_is_the_seeded_request_key():
  a, b = tj.SamplingParams(seed=1).key_data(), tj.SamplingParams(seed=1).key_data()
  assert a.shape == (2,) and a.dtype == np.uint32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, tj.SamplingParams(seed=2).key_data())


@pytest.mark.parametrize("kwargs,named", [
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_p=-1), "top_p=-1"),
    (dict(top_p=float("nan")), "top_p=nan"),
])
def test_invalid_params_are_named(kwargs, named):
  with pytest.raises(ValueError, match=named):
    tj.SamplingParams(**kwargs)
