"""Transport between independent JAX processes: the measurements behind the runtime's choice.

About 20 s on 2 CPU cores; prints round-trip medians and writes results.jsonl:

  python -m experiments.bench_transport --config=configs/bench_transport.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/bench_transport"
  c.array_kib = 128  # the size of one AW->EW buffer of the tiny model at decode, order of
  c.reps = 300  # round trips per measurement (the first 10% are dropped as warm-up)
  c.probe_interval_s = 0.01  # for the detection measurements
  return c
