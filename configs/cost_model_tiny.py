"""The stall cost model calibrated on the tiny MoE (8 CPU devices, 3 AW + 4 EW cells + 1 spare),
checked against one AW and one EW failure with Tarragon and with the global restart, then
extrapolated to the paper's setting and to a DeepSeek-V3-sized model:

  python -m experiments.cost_model --config=configs/cost_model_tiny.py

About a minute on 2 CPU cores; prints predicted vs measured stalls per term and the
extrapolations, and writes results.jsonl, summary.json and cost_model.png under `workdir`.
Run every worker as its own process with `--config.runtime=process` (T_w then includes process
start and JAX init), or compare with another experiment's failure runs instead of running its
own: `--failover_summary=runs/failover_tiny/summary.json` (of experiments/failover.py).
"""

import ml_collections

from configs import tiny
from experiments import launch_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = tiny.get_config().model
  c.seed = 0
  c.workdir = "runs/cost_model_tiny"
  # The engine shape (as configs/failover_tiny.py: one spare device for replacements).
  c.num_aw = 3
  c.num_ew = 4
  c.slots_per_aw = 8
  c.shadows_per_expert = 1
  c.probe_interval_s = 0.01
  c.flush_interval_s = 0.2
  launch_config.add_runtime_fields(c)  # runtime = "local" | "process", ...
  # Failure runs (and calibration): `requests` prompts of `prompt_len` tokens, all at once; the
  # worker (aw1 / ew1) is killed at layer `fault_layer` of decode iteration `fault_token_index`
  # (i in the formulas); each request generates fault_token_index + extra_tokens tokens.
  c.requests = 12
  c.prompt_len = 10
  c.fault_token_index = 8
  c.fault_layer = 1
  c.extra_tokens = 3
  c.failure_reps = 3  # each of the four failure runs, interleaved; medians compared
  # Calibration: batches of `requests` (the first untimed), decode_steps decode iterations each.
  c.calibration = ml_collections.ConfigDict()
  c.calibration.reps = 3
  c.calibration.decode_steps = 8
  c.calibration.layer_reps = 6
  c.calibration.restarts = 2  # T_w: the median
  # With --failover_summary: the failure token index assumed for its global-restart runs (a
  # Poisson workload's first new token after a restart comes from a request that needs only its
  # prefill and one decode step: i = 1).
  c.failover_token_index = 1
  c.flag_threshold = 0.3  # flag |predicted / measured - 1| above this
  # Extrapolation: i = 1..max_token_index; requests in flight per AW (the paper: 50 req/s of
  # ~3.5 s each over 8 AWs is ~20; 16 fills 16 slots); Assumptions in experiments/stall_model.py.
  c.max_token_index = 512
  c.in_flight_per_aw = 16
  c.deepseek_num_ew = 8  # 8 AW + 8 EW as in the paper: 82 GB of FP8 experts per EW (H200)
  c.load_bw_gbs = 2.0
  c.restore_bw_gbs = 25.0
  c.restore_ms = 1.0
  c.detect_ms = 20.0
  return c
