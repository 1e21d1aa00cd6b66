"""A mid-size Mixtral-style MoE for 2 CPU cores: 8 layers, 256 wide, 8 experts top-2 (27 M
parameters, 110 MB in f32), so that stall figures do not all come from a 2-layer model.

  python -m experiments.failover --config=configs/failover_mid.py
  python -m experiments.cost_model --config=configs/cost_model_mid.py
"""

import ml_collections

from experiments.launch_config import model_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_dict(
      family="mixtral",
      vocab_size=1024,
      hidden_size=256,
      num_layers=8,
      num_heads=8,
      num_kv_heads=4,
      head_dim=32,
      num_experts=8,
      top_k=2,
      expert_hidden=512,
      rope_theta=10_000.0,
      rms_eps=1e-5,
      max_seq_len=256,
      dtype="float32",
  )
  return c
