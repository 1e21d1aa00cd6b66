"""The main job: fault-free, an AW kill, an EW kill and an EW hang, each with Tarragon and with
the global-restart baseline, plus fault-free throughput, on the tiny MoE and 8 CPU devices.

About 4 minutes on 2 CPU cores; prints the comparison table and writes summary.json,
results.jsonl, timeline_*.jsonl, timeline.png and stalls.png under `workdir`:

  python -m experiments.failover --config=configs/failover_tiny.py

Override any field, e.g. `--config.fault_at_s=3 --config.workload.rate=10`, or run every
worker as its own process with `--config.runtime=process --config.reps=6 --config.rebuild_every=0`
(the throughput comparison then includes the local runtime; rebuilding would respawn every
worker process), or as Ray actors on a 2-node Ray cluster started for the run, with a node-loss
row: `--config.runtime=ray --config.reps=4 --config.rebuild_every=0` (as root: the cluster runs in
a network namespace of its own).
"""

import ml_collections

from configs import tiny
from experiments import launch_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = tiny.get_config().model
  c.seed = 0
  c.workdir = "runs/failover_tiny"
  # 3 AW + 4 EW cells and one spare device (the replacement's, and the baseline's rebuild).
  c.num_aw = 3
  c.num_ew = 4
  c.slots_per_aw = 8  # headroom: survivors can take a failed AW's requests at once
  c.shadows_per_expert = 1  # Tarragon's engines; the global-restart baseline holds none
  c.probe_interval_s = 0.01  # detection: probe a silent peer every 10 ms, as in the paper
  c.flush_interval_s = 0.2  # the snapshot store's durable tier
  c.warm_all_buckets = True  # compile every step length up front (False: decode + 16 only)
  launch_config.add_runtime_fields(c)  # runtime = "local" | "process" | "ray", ...
  # Failure runs: Poisson "Random" workload in real time, one fault at `fault_at_s`.
  c.workload = ml_collections.ConfigDict()
  c.workload.num_requests = 48
  c.workload.rate = 8.0
  c.workload.prompt_len = 10
  c.workload.output_len = 128  # the paper's "Random": 10 in, 128 out
  c.fault_at_s = 3.0
  c.aw_fault = "kill:aw1"  # + "@t=<fault_at_s>"
  c.ew_fault = "kill:ew1"
  c.hang_fault = "hang:ew1"  # SIGSTOP (local runtime: the worker stops answering)
  c.node_fault = "kill:node1"  # runtime=ray: every worker of a node at once, and its spares
  # Fault-free throughput: `throughput_requests` arrive at once and each generates
  # `throughput_output_len` tokens; `reps` interleaved repetitions of (snapshots on, snapshots
  # off, baseline), engines rebuilt every `rebuild_every` repetitions (0: never), medians
  # reported with a 95 % bootstrap interval. On a small shared host one repetition's ratio is
  # noisy: many short repetitions pin the median better than few long ones. 64 tokens: each
  # run also writes the durable tier (one 64-position chunk per request).
  c.throughput_requests = 24
  c.throughput_output_len = 64
  c.reps = 60
  c.rebuild_every = 4
  return c
