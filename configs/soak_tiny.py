"""Soak: worker processes killed (SIGKILL) or stopped (SIGSTOP) at random for `duration_s`.

Bounded and self-stopping; 10 minutes by default on 2 CPU cores, then the greedy check of a
sample of requests against the single-device reference. Writes results.jsonl, summary.json
and timeline.jsonl under `workdir`:

  python -m experiments.soak --config=configs/soak_tiny.py

A quick look: `--config.duration_s=30`. Under CPU load (false declarations of healthy workers are
reported): `--config.burners=2`.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = tiny.get_config().model
  c.seed = 0
  c.workdir = "runs/soak_tiny"
  c.num_aw = 3
  c.num_ew = 4
  c.slots = 8  # process slots: the workers and one spare (a failed slot comes back)
  c.slots_per_aw = 8
  c.shadows_per_expert = 1
  c.duration_s = 600.0  # arrivals stop then; the run ends when every request is done
  c.fault_every_s = 15.0  # one fault per interval, at a random moment in it
  c.hang_fraction = 0.3  # SIGSTOP instead of SIGKILL
  c.rate = 4.0  # Poisson arrivals (req/s) of the "Random" 10-in/64-out workload
  c.prompt_len = 10
  c.output_len = 64
  c.check_requests = 64  # a sample checked against the single-device greedy reference
  c.burners = 0  # CPU-burner processes beside the run (load); they stop with it
  return c
