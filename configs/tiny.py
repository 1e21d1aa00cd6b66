"""Tiny Mixtral-style MoE that fits the 2-core CPU machines: the default of tests and benchmarks.

Byte-level vocabulary, 2 layers, 8 experts top-2. Run the model benchmark on it with:

  python -m experiments.bench_model --config=configs/tiny.py

Any field can be overridden, e.g. `--config.model.num_layers=4 --config.batch_size=16`.
"""

import ml_collections

from experiments.launch_config import model_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_dict(
      family="mixtral",
      vocab_size=256,  # bytes
      hidden_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      num_experts=8,
      top_k=2,
      expert_hidden=128,
      rope_theta=10_000.0,
      rms_eps=1e-5,
      max_seq_len=256,
      dtype="float32",
  )
  c.seed = 0
  c.workdir = "runs/bench_tiny"
  # Benchmark shape: batch_size requests, a prompt_len-token prefill, then gen_len greedy steps.
  c.batch_size = 8
  c.prompt_len = 32
  c.gen_len = 64
  c.reps = 10  # timed repetitions of each implementation, interleaved
  c.hf_attn = "sdpa"  # HF attn_implementation ("sdpa" is its default, "eager" the plain one)
  c.hf_experts = "grouped_mm"  # HF experts_implementation ("grouped_mm" default, or "eager")
  return c
