"""Fault-free cost of KV snapshots on the tiny MoE and 8 CPU devices (3 AW + 4 EW cells):
snapshots off, the library's asynchronous incremental log, and a naive pause-and-snapshot of
every AW's whole cache every `pause_every` tokens (the paper's foil: 1147 vs 1148 tokens/s
on vs off, pause-and-snapshot every 8 tokens 2.15x slower).

About 2-3 minutes on 2 CPU cores; prints a table and writes results.jsonl, summary.json and
snapshot_overhead.png under `workdir`:

  python -m experiments.snapshot_overhead --config=configs/snapshot_overhead_tiny.py

Override any field, e.g. `--config.reps=9 --config.pause_every=16`.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = tiny.get_config().model
  c.seed = 0
  c.workdir = "runs/snapshot_overhead_tiny"
  # 3 AW + 4 EW cells and one spare device, as in configs/resilience_tiny.py.
  c.num_aw = 3
  c.num_ew = 4
  c.slots_per_aw = 8
  c.shadows_per_expert = 1
  c.flush_interval_s = 0.2  # the snapshot store's durable tier (both snapshot variants)
  # Closed loop: `requests` prompts of `prompt_len` random tokens submitted at once, each
  # generating `output_len` greedy tokens (the paper's "Random": 10 in, 128 out).
  c.requests = 24
  c.prompt_len = 10
  c.output_len = 128
  c.pause_every = 8  # the pause variant snapshots every this many iterations (= tokens)
  c.reps = 11  # interleaved repetitions of (off, incremental, pause); order alternates
  return c
