"""Decode throughput of the disaggregated engine (4 AW + 4 EW) vs the co-located model, and the
per-layer cost of the cross-cell transfers, on the tiny MoE and 8 CPU devices:

  python -m experiments.bench_engine --config=configs/bench_engine.py

About a minute on 2 CPU cores. Override any field, e.g. `--config.reps=3 --config.decode_steps=16`.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = tiny.get_config().model
  c.seed = 0
  c.workdir = "runs/bench_engine"
  c.num_aw = 4
  c.num_ew = 4
  c.devices_per_aw = 1
  c.devices_per_ew = 1
  c.slots_per_aw = 8  # the co-located model decodes num_aw * slots_per_aw rows on one device
  c.shadows_per_expert = 1
  # Each repetition: a fresh batch of every slot, prefilled with prompt_len random tokens (not
  # timed), then decode_steps timed greedy steps, engine and co-located interleaved; then
  # layer_reps synchronous (phase-timed) and asynchronous passes of every layer.
  c.prompt_len = 16
  c.decode_steps = 32
  c.reps = 9
  c.layer_reps = 10
  return c
