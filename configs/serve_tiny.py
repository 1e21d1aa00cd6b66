"""Serves the tiny MoE on 8 CPU devices (4 AW + 4 EW cells) under a Poisson "Random" workload.

About a minute on 2 CPU cores (warm-up, a ~20 s real-time run, then the greedy reference check);
writes summary.json and tokens.jsonl under `workdir`:

  python -m experiments.serve --config=configs/serve_tiny.py

Override any field, e.g. `--config.workload.kind=sharegpt --config.workload.rate=4`, inject
failures with `--config.faults="kill:ew1@t=5; kill:aw2@t=9"` (greedy tokens must still equal
the reference), or serve a trained model with `--checkpoint=runs/train_tiny/checkpoint` (its
config replaces `model`). Every worker its own process: `--config.runtime=process`; on several
hosts, as Ray actors: `--config.runtime=ray` (README, "Several hosts").
"""

import ml_collections

from configs import tiny
from experiments import launch_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = tiny.get_config().model
  c.seed = 0  # parameter init (without --checkpoint) and the workload
  c.workdir = "runs/serve_tiny"
  # Cluster: cells carved from the 8 CPU devices, AWs first.
  c.num_aw = 4
  c.num_ew = 4
  c.devices_per_aw = 1
  c.devices_per_ew = 1
  c.slots_per_aw = 8  # concurrent requests per AW
  c.shadows_per_expert = 1
  c.min_prefill_bucket = 16
  # Workload: Poisson arrivals at `rate` req/s. "random" = prompt_len in, output_len out (the
  # paper's 10/128); "sharegpt" = log-normal lengths with ShareGPT's means times `length_scale`,
  # clipped to the model's max_seq_len.
  c.workload = ml_collections.ConfigDict()
  c.workload.kind = "random"
  c.workload.num_requests = 160
  c.workload.rate = 8.0
  c.workload.prompt_len = 10
  c.workload.output_len = 128
  c.workload.length_scale = 0.25  # sharegpt: 161 * 0.25 ~ 40 prompt, 338 * 0.25 ~ 85 output
  c.workload.length_sigma = 1.0  # sharegpt: log-normal sigma
  # Resilience: `faults` is a schedule armed after warm-up (steps and times count from then),
  # e.g. "kill:ew1@t=5; hang:aw0@t=8" (see tarragon_jax/resilience/faults.py).
  c.faults = ""
  c.recovery = "tarragon"  # or "global_restart", or "package.module:ClassName" (README)
  c.snapshots = True
  c.probe_interval_s = 0.01
  # Where workers run: "local" (this process), "process" (a process each, this host) or
  # "ray" (actors on a Ray cluster; see "Several hosts" in the README).
  launch_config.add_runtime_fields(c)
  c.check_reference = True  # compare every greedy output with reference_greedy (one device)
  c.timeout_s = 600.0  # the real-time run fails after this long
  return c
