r"""Mixtral-8x7B's shape (bf16), for GPU machines; never instantiated as parameters on CPU.

Real weights come from a Hugging Face checkpoint (`tarragon_jax.load_hf_checkpoint`); this config
states the architecture those weights must match. Check that it is a valid ModelConfig with:

  PYTHONPATH=. python -c "from configs import mixtral_8x7b as m; \
from experiments.launch_config import model_config; print(model_config(m.get_config()))"
"""

import ml_collections

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
  c.batch_size = 8
  c.prompt_len = 512
  c.gen_len = 128
  c.reps = 3
  c.hf_attn = "sdpa"
  c.hf_experts = "grouped_mm"
  return c
