"""Failure detection on real worker processes, quiet and beside CPU burners:

  python -m experiments.bench_detection --config=configs/bench_detection.py

About 4 minutes on 2 CPU cores. Prints, per load and detector, the false declarations of healthy
workers and the SIGKILL / SIGSTOP detection latencies (median, p95); writes results.jsonl and
summary.json. A quick look: `--config.healthy_s=5 --config.reps=3`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/bench_detection"
  c.peers = 4  # healthy worker processes, watched and sent requests for the whole run
  c.burners = 2  # CPU burner processes beside the loaded phase (0: the quiet phase only)
  c.detectors = "adaptive,fixed"  # DetectionConfig's defaults; adaptive=False (as before)
  c.healthy_s = 60.0  # per load, every detector at once: requests and idle probes, no fault
  c.idle_s = 0.05  # after each round of requests, idle probing (`Detector.watch`) this long
  c.reps = 5  # per load and detector: this many SIGKILLs and as many SIGSTOPs
  c.warm_rounds = 20  # rounds of requests to a victim before its fault (the detector knows it)
  c.probe_interval_s = 0.01  # the paper's 10 ms
  c.max_suspicion_s = 1.0  # the cap of the adaptive timeout
  return c
