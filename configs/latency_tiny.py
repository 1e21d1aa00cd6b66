"""Fault-free latency and throughput vs load, Tarragon vs the global-restart baseline (Fig. 10-11).

The tiny MoE on 8 CPU devices (4 AW + 4 EW cells), Poisson arrivals at each rate of `rates`
for `arrival_s` seconds, both workloads ("random": 10 in / 128 out, and the ShareGPT-like mix).
About 3 minutes on 2 CPU cores with a warm compilation cache (about 4 on a busy machine with a
cold one); prints the table and writes results.jsonl, summary.json and latency_<workload>.png
under `workdir`:

  python -m experiments.latency --config=configs/latency_tiny.py

Override any field, e.g. `--config.rates="(2.0, 6.0)" --config.workloads="('random',)"` or
`--config.arrival_s=10`.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = tiny.get_config().model
  c.seed = 0  # parameter init and the workloads (the same requests for both modes)
  c.workdir = "runs/latency_tiny"
  # Cluster: cells carved from the 8 CPU devices, AWs first; no spares (nothing fails).
  c.num_aw = 4
  c.num_ew = 4
  c.devices_per_aw = 1
  c.devices_per_ew = 1
  c.slots_per_aw = 8  # concurrent requests per AW
  c.shadows_per_expert = 1
  c.min_prefill_bucket = 16
  c.probe_interval_s = 0.01  # both modes probe idle members this often, as in the paper
  # Load sweep: for each rate (req/s), round(rate * arrival_s) requests (at least 1) arrive as a
  # Poisson process; the run ends when the last one is done. Tarragon and the baseline replay
  # the same requests back to back at each rate, the order alternating from rate to rate.
  c.rates = (4.0, 8.0, 12.0, 16.0)
  c.arrival_s = 5.0
  c.workloads = ("random", "sharegpt")
  c.prompt_len = 10  # random: the paper's 10 in / 128 out
  c.output_len = 128
  c.length_scale = 0.25  # sharegpt: ShareGPT's mean lengths (161 in, 338 out) times this
  c.length_sigma = 1.0  # sharegpt: log-normal sigma
  c.timeout_s = 300.0  # one rate's run fails after this long
  return c
