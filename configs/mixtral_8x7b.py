r"""Mixtral-8x7B's shape (bf16): the model benchmark at a real size on one GPU of >= 100 GB (H200).

Real weights come from a Hugging Face checkpoint (`tarragon_jax.load_hf_checkpoint`); the
benchmark makes random ones on the GPU instead (nothing is downloaded). 93 GB of weights and an
8.6 GB KV cache (batch 64, 1032 positions) do not fit an 80 GB H100; on a 141 GB H200:

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m experiments.bench_model \
    --config=configs/mixtral_8x7b.py

(scripts/device_check.sh runs it where the GPU has the memory). Never instantiated on CPU;
check that it is a valid ModelConfig with:

  python -c "from configs import mixtral_8x7b as m; \
from experiments.launch_config import model_config; print(model_config(m.get_config()))"
"""

import ml_collections

from experiments import roofline
from experiments.launch_config import model_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_dict(
      family="mixtral",
      vocab_size=32_000,
      hidden_size=4096,
      num_layers=32,
      num_heads=32,
      num_kv_heads=8,
      head_dim=128,
      num_experts=8,
      top_k=2,
      expert_hidden=14_336,
      norm_topk_prob=True,
      rope_theta=1e6,
      rms_eps=1e-5,
      max_seq_len=4096,
      dtype="bfloat16",
  )
  c.seed = 0
  c.workdir = "runs/mixtral_8x7b"
  roofline.add_fields(c, batches=(1, 64), context_len=1024, steps=8, reps=3, bandwidth_mib=4096,
                      kernels=("ragged", "ragged_cudnn", "ragged_pallas", "capacity",
                               "capacity_dsf"))
  return c
