r"""Qwen3-30B-A3B's shape (bf16): the model benchmark at a real size on one 80 GB GPU (H100).

128 experts top-8 with renormalized top-k weights, per-head q/k RMSNorm. Real weights come from a
Hugging Face checkpoint (`tarragon_jax.load_hf_checkpoint`); the benchmark makes random ones on
the GPU instead (nothing is downloaded). 61 GB of weights and a 6.5 GB KV cache (batch 64, 1032
positions) fit an 80 GB H100 only once JAX may take more than its default 75% of the memory:

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m experiments.bench_model \
    --config=configs/qwen3_moe.py

scripts/device_check.sh runs it on an 80 GB card (most of its time is compiling, 2 batch sizes x
6 kernel variants). Never instantiated on CPU; check that it is a valid ModelConfig with:

  python -c "from configs import qwen3_moe as m; \
from experiments.launch_config import model_config; print(model_config(m.get_config()))"
"""

import ml_collections

from experiments import roofline
from experiments.launch_config import model_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_dict(
      family="qwen3_moe",
      vocab_size=151_936,
      hidden_size=2048,
      num_layers=48,
      num_heads=32,
      num_kv_heads=4,
      head_dim=128,
      num_experts=128,
      top_k=8,
      expert_hidden=768,  # moe_intermediate_size
      norm_topk_prob=True,
      qk_norm=True,
      rope_theta=1e6,
      rms_eps=1e-6,
      max_seq_len=4096,
      dtype="bfloat16",
  )
  c.seed = 0
  c.workdir = "runs/qwen3_moe"
  # capacity_x4: at batch 64 the capacity kernel's default buffers (capacity_factor 2) overflow
  # in most layers, which then run its exact branch; 4 leaves room.
  roofline.add_fields(c, batches=(1, 64), context_len=1024, steps=8, reps=3, bandwidth_mib=4096,
                      kernels=("ragged", "ragged_cudnn", "ragged_pallas", "capacity",
                               "capacity_dsf", "capacity_x4"))
  return c
