"""KVCache slot operations against a plain numpy model of the cache, with exact asserts.

The model is a dict slot -> list of per-token (k, v), each [L, K, H]. After every operation the
whole cache must equal the model bit for bit: each slot holds exactly its tokens, then zeros.
Legend: L layers, S slots, T max tokens per slot, K kv heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tarragon_jax as tj
from tests.hf_models import random_params

L, S, T, K, H = 2, 5, 6, 2, 4
CONFIG = tj.ModelConfig(num_layers=L, num_kv_heads=K, num_heads=2 * K, head_dim=H, max_seq_len=T)


class NumpyCache:
  """The obvious model: per slot, the list of its tokens' (k, v)."""

  def __init__(self):
    self.slots: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in range(S)}

  def dense(self):
    k = np.zeros((L, S, T, K, H), np.float32)
    v = np.zeros((L, S, T, K, H), np.float32)
    for s, toks in self.slots.items():
      for t, (kt, vt) in enumerate(toks):
        k[:, s, t], v[:, s, t] = kt, vt
    return k, v, np.array([len(self.slots[s]) for s in range(S)], np.int32)


def assert_cache_equals(cache: tj.KVCache, model: NumpyCache):
  k, v, lengths = model.dense()
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
  np.testing.assert_array_equal(np.asarray(cache.k), k)
  np.testing.assert_array_equal(np.asarray(cache.v), v)


def _kv(rng, *shape):
  return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def test_create_is_empty():
  cache = tj.KVCache.create(CONFIG, S)
  assert (cache.num_slots, cache.max_len) == (S, T)
  assert cache.k.shape == cache.v.shape == (L, S, T, K, H)
  assert cache.k.dtype == jnp.float32 and cache.lengths.dtype == jnp.int32
  assert_cache_equals(cache, NumpyCache())
  assert tj.KVCache.create(CONFIG, 2, max_len=3).k.shape == (L, 2, 3, K, H)
  assert tj.KVCache.create(CONFIG.replace(dtype="bfloat16"), 1).k.dtype == jnp.bfloat16


def test_inject_then_read_returns_exactly_what_was_written():
  rng = np.random.default_rng(0)
  k, v = _kv(rng, L, 4, K, H)
  cache = tj.KVCache.create(CONFIG, S).inject(3, k, v)
  got_k, got_v = cache.read(3)
  assert got_k.shape == got_v.shape == (L, 4, K, H)
  np.testing.assert_array_equal(got_k, k)
  np.testing.assert_array_equal(got_v, v)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [0, 0, 0, 4, 0])
  assert cache.read(0)[0].shape == (L, 0, K, H)
  # Re-injecting a shorter request replaces the old one entirely; no stale tail is left.
  k2, v2 = _kv(rng, L, 2, K, H)
  cache = cache.inject(3, k2, v2)
  model = NumpyCache()
  model.slots[3] = [(k2[:, t], v2[:, t]) for t in range(2)]
  assert_cache_equals(cache, model)


def test_append_advances_only_the_given_slots():
  rng = np.random.default_rng(1)
  cache = tj.KVCache.create(CONFIG, S)
  k, v = _kv(rng, L, 3, K, H)
  cache = cache.inject(4, k, v)
  before = jax.tree.map(np.asarray, cache)
  kt, vt = _kv(rng, L, 2, K, H)
  after = cache.append(jnp.asarray([4, 1], jnp.int32), kt, vt)
  np.testing.assert_array_equal(np.asarray(after.lengths), [0, 1, 0, 0, 4])
  np.testing.assert_array_equal(np.asarray(after.k[:, 4, 3]), kt[:, 0])
  np.testing.assert_array_equal(np.asarray(after.v[:, 1, 0]), vt[:, 1])
  for s in (0, 2, 3):
    np.testing.assert_array_equal(np.asarray(after.k[:, s]), before.k[:, s])
    np.testing.assert_array_equal(np.asarray(after.v[:, s]), before.v[:, s])
  # The cache is a value: the old one still holds the old state.
  for old, new in zip(jax.tree.leaves(cache), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(np.asarray(old), new)


def test_drop_empties_only_that_slot():
  rng = np.random.default_rng(2)
  cache = tj.KVCache.create(CONFIG, S)
  model = NumpyCache()
  for s, n in [(0, 2), (1, 5), (2, 3)]:
    k, v = _kv(rng, L, n, K, H)
    cache = cache.inject(s, k, v)
    model.slots[s] = [(k[:, t], v[:, t]) for t in range(n)]
  cache = cache.drop(1)
  model.slots[1] = []
  assert_cache_equals(cache, model)
  assert cache.read(1)[0].shape == (L, 0, K, H)


def test_write_layer_and_advance_with_padding():
  """Positions >= max_len are padding and are dropped; lengths move only on advance()."""
  rng = np.random.default_rng(3)
  cache = tj.KVCache.create(CONFIG, S).inject(2, *_kv(rng, L, 1, K, H))
  slots = jnp.asarray([2, 0], jnp.int32)
  kn, vn = _kv(rng, 2, 3, K, H)
  positions = jnp.asarray([[1, 2, T], [0, T, T]], jnp.int32)  # row 0: 2 tokens, row 1: 1 token
  want_k = np.asarray(cache.k).copy()
  for layer in range(L):
    cache = cache.write_layer(layer, slots, positions, kn * (layer + 1), vn * (layer + 1))
    want_k[layer, 2, 1:3] = kn[0, :2] * (layer + 1)
    want_k[layer, 0, 0] = kn[1, 0] * (layer + 1)
  np.testing.assert_array_equal(np.asarray(cache.k), want_k)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [0, 0, 1, 0, 0])
  cache = cache.advance(slots, jnp.asarray([2, 1], jnp.int32))
  np.testing.assert_array_equal(np.asarray(cache.lengths), [1, 0, 3, 0, 0])
  np.testing.assert_array_equal(cache.read(2)[0][:, 1:], want_k[:, 2, 1:3])


def test_random_operation_sequences_match_numpy_model():
  rng = np.random.default_rng(1234)
  for _ in range(3):
    cache = tj.KVCache.create(CONFIG, S)
    model = NumpyCache()
    for _ in range(40):
      op = rng.choice(["inject", "append", "drop", "write", "read"])
      lens = {s: len(toks) for s, toks in model.slots.items()}
      if op == "inject":
        s, n = int(rng.integers(S)), int(rng.integers(T + 1))
        k, v = _kv(rng, L, n, K, H)
        cache = cache.inject(s, k, v)
        model.slots[s] = [(k[:, t], v[:, t]) for t in range(n)]
      elif op == "append":
        room = [s for s in range(S) if lens[s] < T]
        if not room:
          continue
        slots = rng.permutation(room)[: int(rng.integers(1, len(room) + 1))]
        k, v = _kv(rng, L, len(slots), K, H)
        cache = cache.append(jnp.asarray(slots, jnp.int32), k, v)
        for b, s in enumerate(slots):
          model.slots[int(s)].append((k[:, b], v[:, b]))
      elif op == "drop":
        s = int(rng.integers(S))
        cache = cache.drop(s)
        model.slots[s] = []
      elif op == "write":  # what extend() does: write every layer, then advance once
        slots = rng.permutation(S)[: int(rng.integers(1, S + 1))]
        width = 3  # rows hold 0 to 3 real tokens; the rest is padding
        n_new = [int(rng.integers(0, min(width, T - lens[int(s)]) + 1)) for s in slots]
        t = np.arange(width)[None, :]
        starts = np.array([lens[int(s)] for s in slots])[:, None]
        positions = np.where(t < np.array(n_new)[:, None], starts + t, T)
        k, v = _kv(rng, L, len(slots), width, K, H)
        for layer in range(L):
          cache = cache.write_layer(layer, jnp.asarray(slots, jnp.int32),
                                    jnp.asarray(positions, jnp.int32), k[layer], v[layer])
        cache = cache.advance(jnp.asarray(slots, jnp.int32), jnp.asarray(n_new, jnp.int32))
        for b, s in enumerate(slots):
          model.slots[int(s)] += [(k[:, b, j], v[:, b, j]) for j in range(n_new[b])]
      else:
        s = int(rng.integers(S))
        got_k, got_v = cache.read(s)
        want = model.slots[s]
        assert got_k.shape == (L, len(want), K, H)
        for t, (kt, vt) in enumerate(want):
          np.testing.assert_array_equal(got_k[:, t], kt)
          np.testing.assert_array_equal(got_v[:, t], vt)
      assert_cache_equals(cache, model)


@pytest.mark.parametrize("slot", [S, -1, 100])
@pytest.mark.parametrize("op", ["inject", "read", "drop"])
def test_out_of_range_slot_is_named(op, slot):
  cache = tj.KVCache.create(CONFIG, S)
  args = {"inject": (np.zeros((L, 1, K, H)),) * 2}.get(op, ())
  with pytest.raises(ValueError, match=rf"slot {slot} out of range \[0, {S}\)"):
    getattr(cache, op)(slot, *args)


@pytest.mark.parametrize("k_shape,v_shape", [
    ((L, 2, K, H + 1), (L, 2, K, H + 1)),  # wrong head dim
    ((L + 1, 2, K, H), (L + 1, 2, K, H)),  # wrong layer count
    ((L, 2, K, H), (L, 3, K, H)),  # k and v disagree
])
def test_inject_wrong_shape_names_the_shapes(k_shape, v_shape):
  cache = tj.KVCache.create(CONFIG, S)
  with pytest.raises(ValueError, match=rf"k {k_shape}.*v {v_shape}".replace("(", r"\(")
                     .replace(")", r"\)")):
    cache.inject(0, np.zeros(k_shape, np.float32), np.zeros(v_shape, np.float32))


def test_inject_too_long_names_the_lengths():
  cache = tj.KVCache.create(CONFIG, S)
  with pytest.raises(ValueError, match=rf"{T + 1} tokens do not fit a slot of {T}"):
    cache.inject(0, np.zeros((L, T + 1, K, H)), np.zeros((L, T + 1, K, H)))


def test_create_rejects_zero_slots():
  with pytest.raises(ValueError, match="num_slots=0"):
    tj.KVCache.create(CONFIG, 0)


def test_extend_leaves_other_slots_bit_identical():
  """Prefill of slot 1 then decode: every other slot, including an idle row's, is untouched."""
  cfg = tj.ModelConfig(vocab_size=32, hidden_size=16, num_layers=L, num_heads=2 * K,
                       num_kv_heads=K, head_dim=H, num_experts=4, top_k=2, expert_hidden=16,
                       max_seq_len=T)
  params = random_params(cfg, seed=0)
  rng = np.random.default_rng(5)
  cache = tj.KVCache.create(cfg, S)
  for s, n in [(0, 3), (3, 5), (4, 1)]:
    cache = cache.inject(s, *_kv(rng, L, n, K, H))
  others = [0, 2, 3, 4]
  before_k = np.asarray(cache.k)[:, others]
  before_v = np.asarray(cache.v)[:, others]
  before_len = np.asarray(cache.lengths)[others]

  slots = jnp.asarray([1, 3], jnp.int32)  # row 1 (slot 3) is idle throughout: n_new = 0
  prompt = jnp.asarray(rng.integers(0, 32, (2, 4)), jnp.int32)
  _, cache = tj.extend(params, cfg, cache, prompt, slots, jnp.asarray([4, 0], jnp.int32))
  for _ in range(2):
    tok = jnp.asarray(rng.integers(0, 32, (2, 1)), jnp.int32)
    _, cache = tj.extend(params, cfg, cache, tok, slots, jnp.asarray([1, 0], jnp.int32))

  np.testing.assert_array_equal(np.asarray(cache.k)[:, others], before_k)
  np.testing.assert_array_equal(np.asarray(cache.v)[:, others], before_v)
  np.testing.assert_array_equal(np.asarray(cache.lengths)[others], before_len)
  assert int(cache.lengths[1]) == 6
  assert np.all(np.asarray(cache.k)[:, 1] != 0)
