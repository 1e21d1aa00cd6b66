"""The cost of taking each step's KV for the snapshot store in an AW's last call (sampling):
no snapshots vs the library's extraction vs one gather, on the tiny MoE:

  python -m experiments.bench_snapshot_kv --config=configs/bench_snapshot_kv.py

About 30 seconds on 2 CPU cores. Override any field, e.g. `--config.reps=5 --config.calls=20`.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = tiny.get_config().model
  c.seed = 0
  c.workdir = "runs/bench_snapshot_kv"
  c.slots_per_aw = 8  # rows of the AW's batch (the main job's AWs)
  c.seq_lens = (1, 16)  # a decode step, and a prefill bucket
  # Each repetition: `calls` calls of each variant on a fresh cache, variants interleaved.
  c.reps = 30
  c.calls = 100
  return c
