"""The flax nnx module: the same weights and functions as the library, so the same logits; its
logical axes shard it under a flax user's rules; a flax training step runs and learns."""

import flax.linen
import jax
import numpy as np
import optax
from flax import nnx

import tarragon_jax as tj
from tarragon_jax.flax_nnx import MoETransformer
from tests.hf_models import TinyMoE, build_hf_model

CFG = tj.ModelConfig(max_seq_len=32)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 9)).astype(np.int32)


def test_its_logits_are_forwards_from_random_weights_and_from_a_hugging_face_checkpoint(tmp_path):
  model = MoETransformer(CFG, rngs=nnx.Rngs(params=0))
  np.testing.assert_array_equal(np.asarray(model(TOKENS)),
                                np.asarray(tj.forward(model.params(), CFG, TOKENS)))
  path, _ = build_hf_model(TinyMoE("qwen3_moe", vocab=96), str(tmp_path / "hf"), seed=1)
  config, params = tj.load_hf_checkpoint(path)
  hf = MoETransformer.from_hf(path)
  tokens = TOKENS % 96
  np.testing.assert_array_equal(np.asarray(hf(tokens)),
                                np.asarray(tj.forward(params, config, tokens)))
  assert "layers.moe.experts.w_gate" in nnx.state(hf, nnx.Param)["weights"]


def test_a_flax_users_logical_axis_rules_shard_it():
  model = MoETransformer(CFG, rngs=nnx.Rngs(params=1))
  want = np.asarray(model(TOKENS))
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("experts", "model"), ("q_heads", "model"), ("batch", "data"))
  state = nnx.state(model, nnx.Param)
  shardings = flax.linen.logical_to_mesh_sharding(nnx.get_partition_spec(state), mesh, rules)
  nnx.update(model, jax.device_put(state, shardings))
  w_gate = model.weights["layers.moe.experts.w_gate"][...]  # [L, E, D, F], E over "model"
  assert {s.data.shape for s in w_gate.addressable_shards} == {(2, 2, 64, 128)}
  np.testing.assert_allclose(np.asarray(model(TOKENS)), want, atol=1e-5)


def test_a_flax_training_step_runs_and_lowers_the_loss():
  model = MoETransformer(CFG, rngs=nnx.Rngs(params=2))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    def loss_fn(model):
      logits = model(batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, TOKENS)) for _ in range(8)]
  assert losses[-1] < losses[0] - 0.5, losses  # one batch, memorized
