"""What loading its weights costs a worker process, its part only against the whole model cut:

  python -m experiments.worker_memory --config=configs/worker_memory.py

The mid-size model with 16 experts of 256 x 1024 (392 MiB in f32; each expert matrix 1 MiB, a
checkpoint chunk of its own), 4 EWs with a shadow of every expert. About 2 minutes on 2 CPU
cores.
"""

import ml_collections

from configs import mid


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = mid.get_config().model
  c.model.num_experts = 16
  c.model.expert_hidden = 1024
  c.seed = 0
  c.workdir = "runs/worker_memory"
  c.num_ew = 4
  c.shadows_per_expert = 1
  c.reps = 3  # each: every worker's load both ways, in fresh processes, the ways' order alternated
  return c
