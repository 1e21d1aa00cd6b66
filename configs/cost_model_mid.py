"""The stall cost model (configs/cost_model_tiny.py) calibrated and checked on the mid-size MoE
(configs/mid.py: 8 layers, 256 wide):

  python -m experiments.cost_model --config=configs/cost_model_mid.py
"""

import ml_collections

from configs import cost_model_tiny, mid


def get_config() -> ml_collections.ConfigDict:
  c = cost_model_tiny.get_config()
  c.model = mid.get_config().model
  c.workdir = "runs/cost_model_mid"
  return c
