r"""Qwen3-30B-A3B's shape (bf16), for GPU machines; never instantiated as parameters on CPU.

128 experts top-8 with renormalized top-k weights, per-head q/k RMSNorm. Real weights come from a
Hugging Face checkpoint (`tarragon_jax.load_hf_checkpoint`). Check that it is a valid ModelConfig:

  PYTHONPATH=. python -c "from configs import qwen3_moe as m; \
from experiments.launch_config import model_config; print(model_config(m.get_config()))"
"""

import ml_collections

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
  c.batch_size = 8
  c.prompt_len = 512
  c.gen_len = 128
  c.reps = 3
  c.hf_attn = "sdpa"
  c.hf_experts = "grouped_mm"
  return c
