"""Ablation of Tarragon's components on the tiny MoE and 8 CPU devices: fault-free closed-loop
throughput with each component switched off in turn, against all on and the global restart.

About 3 minutes on 2 CPU cores; prints the table and writes results.jsonl, summary.json and
ablation.png under `workdir`:

  python -m experiments.ablation --config=configs/ablation_tiny.py

Override any field, e.g. `--config.reps=9` or `--config.variants=all_on,no_snapshots,
global_restart` (all_on and global_restart are always run: the ratios are taken to them).
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = tiny.get_config().model
  c.seed = 0
  c.workdir = "runs/ablation_tiny"
  # The cluster of configs/failover_tiny.py: 3 AW + 4 EW cells and one spare device.
  c.num_aw = 3
  c.num_ew = 4
  c.slots_per_aw = 8
  # All-on settings; a variant switches one of them off (see VARIANTS in experiments/ablation.py).
  c.shadows_per_expert = 1
  c.probe_interval_s = 0.01  # the paper's 10 ms
  c.flush_interval_s = 0.2  # the snapshot store's durable (tensorstore) tier
  c.off_interval_s = 1e4  # "off" for the probe and flush intervals: never within a run
  c.variants = ("all_on,no_snapshots,no_shadows,no_probing,no_durable_tier,no_replacements,"
                "all_off,global_restart")
  # Closed loop: `requests` prompts arrive at once (3 AWs x 8 slots: one full batch), greedy.
  c.requests = 24
  c.prompt_len = 10
  c.output_len = 128  # the paper's "Random": 10 in, 128 out
  c.reps = 11  # interleaved repetitions of every variant; medians reported
  return c
