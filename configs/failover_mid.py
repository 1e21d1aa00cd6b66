"""The main job (configs/failover_tiny.py) on the mid-size MoE (configs/mid.py: 8 layers, 256
wide), with fewer throughput repetitions so that it fits about 15 minutes on 2 CPU cores:

  python -m experiments.failover --config=configs/failover_mid.py
"""

import ml_collections

from configs import failover_tiny, mid


def get_config() -> ml_collections.ConfigDict:
  c = failover_tiny.get_config()
  c.model = mid.get_config().model
  c.workdir = "runs/failover_mid"
  c.reps = 20
  return c
