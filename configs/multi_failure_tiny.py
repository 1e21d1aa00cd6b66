"""Multiple and concurrent failures, Tarragon vs the global-restart baseline, on the tiny MoE and
8 CPU devices (2 AW + 4 EW cells and 2 spare devices: each scenario's two failures can both be
replaced).

About 3 minutes on 2 CPU cores; prints the table and writes results.jsonl, summary.json,
timeline_<run>.jsonl and multi_failure.png under `workdir`:

  python -m experiments.multi_failure --config=configs/multi_failure_tiny.py

Each scenario is a fault schedule (the `--config.faults` syntax of experiments/serve.py) in
which `{t}` is `fault_at_s` and `{t2}` is `fault_at_s + gap_s`. Override any field, e.g.
`--config.only=two_ews,store_and_aw`, `--config.num_aw=3` (one spare: the second failure of a
scenario then finds none) or `--config.scenarios.two_ews="kill:ew1@t={t}; kill:ew3@t={t}"`.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = tiny.get_config().model
  c.seed = 0
  c.workdir = "runs/multi_failure_tiny"
  c.num_aw = 2
  c.num_ew = 4  # 8 experts, 1 shadow each: EW pairs (0, 1), (1, 2), (2, 3), (3, 0) hold both
  #               replicas of 4 (layer, expert) pairs; (0, 2) and (1, 3) leave none unreachable
  c.slots_per_aw = 8
  c.shadows_per_expert = 1  # Tarragon's; the baseline holds `baseline_shadows` (MegaScale: none)
  c.baseline_shadows = 0
  c.probe_interval_s = 0.01
  c.flush_interval_s = 0.2
  c.warm_all_buckets = True  # a re-prefill (store lost) runs long step lengths: compile them all
  # Poisson "Random" workload in real time.
  c.workload = ml_collections.ConfigDict()
  c.workload.num_requests = 32
  c.workload.rate = 8.0
  c.workload.prompt_len = 10
  c.workload.output_len = 128
  c.fault_at_s = 2.0
  c.gap_s = 1.0  # {t2}: the second failure of a sequence
  c.run_timeout_s = 300.0
  c.scenarios = ml_collections.ConfigDict()
  c.scenarios.two_ews = "kill:ew1@t={t}; kill:ew2@t={t}"
  c.scenarios.aw_and_ew = "kill:aw1@t={t}; kill:ew2@t={t}"
  c.scenarios.sequence = "kill:ew1@t={t}; kill:aw1@t={t2}"
  c.scenarios.during_recovery = "kill:aw1@t={t}; kill:ew1@when=recovery"
  c.scenarios.store_and_aw = "kill:store@t={t}; kill:aw1@t={t}"
  c.scenarios.hang_and_kill = "hang:aw0@t={t}; kill:ew1@t={t}"
  c.only = ""  # comma-separated scenario names; "" = all
  return c
