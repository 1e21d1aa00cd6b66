"""A mid-size MoE (float32, 0.25 GB) for the model benchmark's roofline mode on the CPU machines.

Decode tokens/s and the fraction of the measured memory bandwidth, at batch 1 and 16, for the
ragged and capacity expert kernels; no torch, no checkpoint. Well under a minute on 2 cores:

  python -m experiments.bench_model --config=configs/bench_model_roofline.py

The real shapes run the same way on a GPU host: configs/qwen3_moe.py, configs/mixtral_8x7b.py.
"""

import ml_collections

from experiments import roofline
from experiments.launch_config import model_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Weights (0.25 GB) well past the CPU's caches, so that a step reads memory, not cache.
  c.model = model_dict(
      family="mixtral",
      vocab_size=8192,
      hidden_size=512,
      num_layers=4,
      num_heads=8,
      num_kv_heads=2,
      head_dim=64,
      num_experts=8,
      top_k=2,
      expert_hidden=1024,
      rope_theta=10_000.0,
      rms_eps=1e-5,
      max_seq_len=512,
      dtype="float32",
  )
  c.seed = 0
  c.workdir = "runs/bench_model_roofline"
  roofline.add_fields(c, batches=(1, 16), kernels=("ragged", "capacity"), context_len=256,
                      steps=8, reps=3, bandwidth_mib=256)
  return c
