"""Restoring a failed request's KV cache vs replaying it, by failure token index (paper Fig. 12).

One CPU device, the tiny MoE; under a minute on 2 CPU cores. Prints the table and writes
results.jsonl, summary.json and replay.png under `workdir`:

  python -m experiments.replay --config=configs/replay_tiny.py

`--config=configs/replay_tiny.py:small` runs a larger (still small) model whose KV is 1/8 of its
AW<->EW traffic per token, as Mixtral-8x7B's is (the tiny model's is 1/4): about 75 s on 2 CPU
cores with `--config.reps=3`. Override any field, e.g. `--config.token_indices=1,8
--config.reps=2`. On a GPU, add JAX_DEFAULT_MATMUL_PRECISION=highest: with JAX's default (TF32)
matmuls a parallel replay's KV differs from the decoded original by ~1e-3 (more after a routing
flip), beyond `kv_atol`, though the greedy tokens still agree.
"""

import ml_collections

from configs import tiny
from experiments.launch_config import model_dict


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  variant = variant or "tiny"
  if variant == "tiny":
    c.model = tiny.get_config().model
    # The longest index leaves room for the prompt and the continuation: 10 + 238 + 8 = 256.
    c.token_indices = (1, 8, 16, 32, 64, 128, 238)
  elif variant == "small":
    c.model = model_dict(
        family="mixtral", vocab_size=1024, hidden_size=256, num_layers=8, num_heads=4,
        num_kv_heads=1, head_dim=64, num_experts=8, top_k=2, expert_hidden=512,
        max_seq_len=512, dtype="float32")
    c.token_indices = (1, 8, 16, 32, 64, 128, 256, 494)
  else:
    raise ValueError(f"replay_tiny: variant {variant!r}; use 'tiny' or 'small'")
  c.seed = 0
  c.workdir = f"runs/replay_{variant}"
  c.prompt_len = 10  # the paper's "Random" workload: 10 input tokens
  c.continue_tokens = 8  # greedy steps decoded from every restored / replayed cache, compared
  c.num_slots = 4  # the fresh cache each method fills; the request goes into its last slot
  c.min_prefill_bucket = 16  # as EngineConfig's: replays pad to power-of-two buckets >= this
  c.reps = 7  # timed repetitions per (method, index), methods interleaved; medians reported
  c.kv_atol = 1e-4  # |replayed KV - original KV| allowed (float32 matmuls)
  return c
