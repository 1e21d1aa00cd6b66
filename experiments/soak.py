"""Soak of the process runtime: random SIGKILL / SIGSTOP of random workers while serving.

  python -m experiments.soak --config=configs/soak_tiny.py

Every AW, EW and the snapshot store is its own process. One fault per `fault_every_s` (a random
worker or the store, a random moment; SIGSTOP for `hang_fraction` of them, else SIGKILL; the
slot comes back, as after a process crash) while a Poisson workload arrives for `duration_s`,
optionally beside `burners` CPU-burner processes (load; each stops by itself when this process
is gone or after the longest the run can take). Reports requests completed, tokens lost (must be
0), duplicates dropped, false declarations (workers declared failed that no fault touched),
stall statistics per failure, and whether a sample of requests matches the single-device greedy
reference. The config is checked before anything starts.
"""

from __future__ import annotations

import os

import jax

jax.config.update("jax_num_cpu_devices", 1)  # the driver computes nothing; workers do

import numpy as np  # noqa: E402
from absl import app  # noqa: E402

import tarragon_jax as tj  # noqa: E402
from experiments import launch_config  # noqa: E402
from experiments import workload as wl  # noqa: E402
from tarragon_jax.resilience.faults import Fault  # noqa: E402
from tarragon_jax.runtime.remote import ProcessRuntime  # noqa: E402
from tarragon_jax.runtime.spawner import LocalSpawner  # noqa: E402
from tarragon_jax.serving.engine import Engine  # noqa: E402
from tarragon_jax.serving.metrics import fault_stalls  # noqa: E402
from tarragon_jax.serving.reference import reference_greedy  # noqa: E402

_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags("configs/soak_tiny.py")


def check_config(cd):
  """Refuses a config that cannot run, before anything starts.

  Raises:
    ValueError: naming the field and what it must be.
  """
  def need(ok: bool, field: str, what: str):
    if not ok:
      raise ValueError(f"soak: {field}={cd[field]!r}; {what}")

  need(cd.duration_s > 0, "duration_s", "the serving time must be > 0 s")
  need(cd.fault_every_s > 0, "fault_every_s",
       "one fault per this many seconds must be > 0 (a run without faults: set it above "
       "duration_s)")
  need(0 <= cd.hang_fraction <= 1, "hang_fraction", "the share of SIGSTOPs must be in [0, 1]")
  need(cd.rate > 0, "rate", "arrivals per second must be > 0")
  need(isinstance(cd.burners, int) and cd.burners >= 0, "burners",
       "the number of CPU-burner processes must be an integer >= 0")
  need(cd.check_requests >= 0, "check_requests", "must be >= 0")


def schedule(cd, rng) -> list[Fault]:
  workers = ([f"aw{i}" for i in range(cd.num_aw)] + [f"ew{i}" for i in range(cd.num_ew)]
             + ["store"])
  faults = []
  for k in range(int(cd.duration_s // cd.fault_every_s)):
    t = (k + rng.uniform(0.2, 0.8)) * cd.fault_every_s
    kind = "hang" if rng.uniform() < cd.hang_fraction else "kill"
    faults.append(Fault(str(rng.choice(workers)), kind, time_s=float(t), lost_device=-1))
  return faults


def main(argv):
  del argv
  cd = _CONFIG.value
  check_config(cd)
  launch_config.enable_compile_cache(_CACHE.value)
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  cfg = launch_config.model_config(cd)
  params = tj.init_params(cfg, jax.random.key(cd.seed))
  rng = np.random.default_rng(cd.seed)
  n = max(1, int(cd.rate * cd.duration_s))
  work = wl.make_workload("random", cfg, num_requests=n, rate=cd.rate, seed=cd.seed,
                          prompt_len=cd.prompt_len, output_len=cd.output_len)
  engine = Engine(cfg, params, launch_config.engine_config(cd),
                  runtime=ProcessRuntime(LocalSpawner(cd.slots), _CACHE.value))
  timeout_s = cd.duration_s * 4 + 120
  try:
    engine.warm_up([1, 16])
    faults = schedule(cd, rng)
    engine.arm_faults(faults)
    with launch_config.cpu_burners(cd.burners, timeout_s + 600):
      launch_config.progress("soak: %d requests over %.0f s, %d faults, %d burners", n,
                             cd.duration_s, len(faults), cd.burners)
      result = wl.replay(engine, work, timeout_s=timeout_s)
      loadavg = os.getloadavg()[0]  # over the last minute of serving
      engine.recovery.wait_for_replacements()
  finally:
    engine.close()

  outputs = [engine.tokens(r) for r in result.ids]
  lost = sum(r.max_new_tokens - len(o) for (_, r), o in zip(work, outputs))
  duplicates = sum(engine.streams[r].duplicates for r in result.ids)
  mismatches = sum(len(engine.streams[r].mismatches) for r in result.ids)
  events, arrivals = result.events(engine), result.arrivals(engine)
  stalls = [dict(worker=f["worker"], kind=f["kind"], **s)
            for f, s in fault_stalls(events, engine.timeline, arrivals)]
  sample = sorted(rng.choice(len(work), min(cd.check_requests, len(work)), replace=False))
  expected = reference_greedy(params, cfg, [work[i][1].prompt for i in sample],
                              [work[i][1].max_new_tokens for i in sample])
  match = all(outputs[i] == want for i, want in zip(sample, expected))
  engine.timeline.write_jsonl(os.path.join(workdir, "timeline.jsonl"), result.start)
  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), stalls)
  gaps = [s["max_request_gap_s"] for s in stalls if s["held"]]
  false = engine.timeline.unexplained_declarations()
  summary = dict(result.summary(engine), faults=len(stalls),
                 declared=len(engine.timeline.of("declared_failed")),
                 false_declarations=len(false),
                 falsely_declared=[dict(worker=e["worker"], how=e["how"],
                                        t=round(e["t"] - result.start, 3)) for e in false],
                 burners=cd.burners, loadavg_1min=round(loadavg, 2),
                 replacements=len(engine.timeline.of("replacement_joined")),
                 store_restarts=len(engine.timeline.of("store_started")),
                 tokens_lost=lost, duplicates_dropped=duplicates, mismatches=mismatches,
                 sample_matches_reference=match, sample_size=len(sample),
                 max_request_gap_s_median=float(np.median(gaps)) if gaps else None,
                 max_request_gap_s_max=max(gaps, default=None))
  launch_config.write_summary(workdir, summary, cd)
  print(f"soak: {summary['completed']}/{summary['requests']} requests, {len(stalls)} faults "
        f"({summary['declared']} declared, {len(false)} of them false, "
        f"{summary['replacements']} replacements, "
        f"{summary['store_restarts']} store restarts), tokens "
        f"lost {lost}, duplicates dropped {duplicates}, mismatches {mismatches}; max request "
        f"gap per failure: median {summary['max_request_gap_s_median']}, max "
        f"{summary['max_request_gap_s_max']} s; sample == reference: {match}; {cd.burners} "
        f"burners, load average {loadavg:.1f} -> {workdir}")


if __name__ == "__main__":
  app.run(main)
