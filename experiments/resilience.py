"""Failure stalls and fault-free throughput: Tarragon recovery vs the global-restart baseline.

  PYTHONPATH=. python -m experiments.resilience --config=configs/resilience_tiny.py

On one workload (Poisson "Random" requests, real time) it runs: a fault-free pass, one AW
failure and one EW failure with Tarragon recovery, and the same two failures with the
MegaScale-like global restart. For each failure it reports the service stall (longest time
with zero output tokens), the max request stall (extra gap of one request), recomputed tokens,
detection latency, restore time and bytes, recompilations and whether every request's greedy
tokens equal the fault-free run's; then fault-free throughput with snapshots on vs off and vs
the baseline (closed loop, interleaved repetitions). Writes results.jsonl, summary.json,
timeline_<run>.jsonl and throughput.png (output tokens/s over time per failure run).
"""

from __future__ import annotations

import os
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX use: AW and EW cells are carved

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import tarragon_jax as tj  # noqa: E402
from tarragon_jax import launch_config  # noqa: E402
from tarragon_jax.checkpoint import save_checkpoint  # noqa: E402
from tarragon_jax.mesh.cells import CellPlan  # noqa: E402
from tarragon_jax.resilience.detector import DetectionConfig  # noqa: E402
from tarragon_jax.resilience.faults import parse_faults  # noqa: E402
from tarragon_jax.runtime.remote import ProcessRuntime  # noqa: E402
from tarragon_jax.serving import workload as wl  # noqa: E402
from tarragon_jax.serving.engine import Engine, EngineConfig, ResilienceConfig  # noqa: E402
from tarragon_jax.serving.metrics import compile_count, stall_summary  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/resilience_tiny.py", "Config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; default: the config's workdir.")
_CACHE = flags.DEFINE_string(
    "compile_cache", launch_config.DEFAULT_COMPILE_CACHE,
    "Persistent compilation cache directory ('' = off). Both policies get it.")
_BIN_S = 0.25


def _engine(cd, cfg, params, weights_dir, recovery: str, snapshots: bool, spawner) -> Engine:
  """An engine on this process's devices (`spawner` None) or on worker processes."""
  rc = ResilienceConfig(recovery=recovery, snapshots=snapshots, weights_dir=weights_dir,
                        flush_interval_s=cd.flush_interval_s,
                        detection=DetectionConfig(probe_interval_s=cd.probe_interval_s))
  plan = CellPlan(cd.num_aw, cd.num_ew)
  engine = Engine(cfg, params, EngineConfig(plan=plan, slots_per_aw=cd.slots_per_aw,
                                            shadows_per_expert=cd.shadows_per_expert,
                                            resilience=rc),
                  runtime=None if spawner is None else ProcessRuntime(spawner, _CACHE.value))
  engine.warm_up(None if cd.warm_all_buckets else [1, 16])  # before measuring
  return engine


def _failure_run(name, cd, cfg, params, weights_dir, work, reference, recovery, fault, workdir,
                 spawner, snapshots=True):
  engine = _engine(cd, cfg, params, weights_dir, recovery,
                   snapshots and recovery == "tarragon", spawner)
  engine.arm_faults(parse_faults(f"{fault}@t={cd.fault_at_s}") if fault else ())
  compiles = compile_count()
  result = wl.replay(engine, work)
  compiled = compile_count() - compiles
  engine.recovery.wait_for_replacements()
  engine.close()
  outputs = [engine.tokens(r) for r in result.ids]
  events = result.events(engine)
  record = dict(run=name, mode=recovery, fault=fault.split(":")[1][:2] if fault else "none",
                snapshots=engine.engine_cfg.resilience.snapshots,
                **result.summary(engine), compiles_during_run=compiled,
                tokens_match_fault_free=None if reference is None else outputs == reference)
  faults = engine.timeline.of("fault")
  if faults:
    record.update(stall_summary(events, faults[0]["t"]))
    s = engine.summary()
    record.update({k: s[k] for k in ("detection_s", "restores", "reprefills", "restore_bytes",
                                     "restore_s_max", "recomputed_tokens",
                                     "recomputed_token_layers", "uncommitted_tail_tokens")})
    record["restart_phases"] = s.get("restarts", [])
    joined = engine.timeline.of("replacement_joined")
    record["replacement_joined_after_s"] = joined[0]["t"] - faults[0]["t"] if joined else None
    engine.timeline.write_jsonl(os.path.join(workdir, f"timeline_{name}.jsonl"), result.start)
  times = np.asarray([e.time - result.start for e in events])
  return record, outputs, times


def _throughput(cd, cfg, params, weights_dir, spawner) -> list[dict]:
  """Closed loop: every request at t=0; tokens/s of each variant, interleaved repetitions."""
  variants = {"snapshots_on": ("tarragon", True, spawner),
              "snapshots_off": ("tarragon", False, spawner),
              "global_restart": ("global_restart", False, spawner)}
  if spawner is not None:
    variants["local_runtime"] = ("tarragon", True, None)
  engines = {k: _engine(cd, cfg, params, weights_dir, *v) for k, v in variants.items()}
  rng = np.random.default_rng(cd.seed + 1)
  w = cd.workload
  records = []
  for rep in range(cd.reps):
    prompts = rng.integers(0, cfg.vocab_size, (cd.throughput_requests, w.prompt_len))
    for name in (list(engines) if rep % 2 == 0 else list(engines)[::-1]):
      engine = engines[name]
      start = time.perf_counter()
      outs = engine.generate(prompts.tolist(), w.output_len)
      seconds = time.perf_counter() - start
      records.append(dict(run="throughput", variant=name, rep=rep, seconds=seconds,
                          throughput_tok_s=sum(map(len, outs)) / seconds))
      logging.info("throughput %s rep %d: %.0f tok/s", name, rep, records[-1]["throughput_tok_s"])
  for engine in engines.values():
    engine.close()
  return records


def main(argv):
  del argv
  cd = _CONFIG.value
  launch_config.enable_compile_cache(_CACHE.value)
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  cfg = launch_config.model_config(cd)
  params = tj.init_params(cfg, jax.random.key(cd.seed))
  weights_dir = os.path.dirname(save_checkpoint(os.path.join(workdir, "weights"), params, cfg))
  w = cd.workload
  work = wl.make_workload("random", cfg, num_requests=w.num_requests, rate=w.rate, seed=cd.seed,
                          prompt_len=w.prompt_len, output_len=w.output_len)

  spawner = launch_config.make_spawner(cd)
  try:
    records, series = _runs(cd, cfg, params, weights_dir, work, workdir, spawner)
  finally:
    if spawner is not None:
      spawner.close()
  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  plot = launch_config.save_line_plot(
      os.path.join(workdir, "throughput.png"), series, xlabel="time since start (s)",
      ylabel="output tokens/s", title=f"failure at t = {cd.fault_at_s} s")
  summary = _report(records, cd)
  summary["plot"] = plot
  launch_config.write_summary(workdir, summary, cd)
  print(f"-> {workdir}")


def _runs(cd, cfg, params, weights_dir, work, workdir, spawner):
  """The fault-free pass, the four failure runs and the throughput repetitions."""
  records, series = [], {}
  base, outputs, _ = _failure_run("fault_free", cd, cfg, params, weights_dir, work, None,
                                  "tarragon", "", workdir, spawner)
  records.append(base)
  runs = [("tarragon_aw", "tarragon", cd.aw_fault, True),
          ("tarragon_aw_no_snapshots", "tarragon", cd.aw_fault, False),
          ("global_restart_aw", "global_restart", cd.aw_fault, False),
          ("tarragon_ew", "tarragon", cd.ew_fault, True),
          ("global_restart_ew", "global_restart", cd.ew_fault, False)]
  for name, recovery, fault, snapshots in runs:
    logging.info("run %s (%s at t=%.1f s)", name, fault, cd.fault_at_s)
    rec, _, times = _failure_run(name, cd, cfg, params, weights_dir, work, outputs, recovery,
                                 fault, workdir, spawner, snapshots)
    records.append(rec)
    counts, edges = np.histogram(times, bins=np.arange(0.0, times.max() + 2 * _BIN_S, _BIN_S))
    series[name] = (list(edges[:-1]), list(counts / _BIN_S))
  records += _throughput(cd, cfg, params, weights_dir, spawner)
  return records, series


def _report(records: list[dict], cd) -> dict:
  runs = {r["run"]: r for r in records if r["run"] != "throughput"}
  print(f"\n{'run':<26}{'service':>9}{'max req':>9}{'max req':>9}{'recomp.':>8}{'detect':>8}"
        f"{'restore':>9}{'com-':>6}{'tok/s':>7}{'done':>7}  tokens ==")
  print(f"{'':<26}{'stall':>9}{'stall':>9}{'gap':>9}{'tokens':>8}{'':>8}{'':>9}{'piles':>6}"
        f"{'':>7}{'':>7}  fault-free")
  for name, r in runs.items():
    if r["fault"] == "none":
      continue
    restart = r["restart_phases"][0]["total_s"] if r["restart_phases"] else r["restore_s_max"]
    print(f"{name:<26}{r['service_stall_s'] * 1e3:>7.1f}ms{r['max_request_stall_s'] * 1e3:>7.1f}ms"
          f"{r['max_request_gap_s'] * 1e3:>7.1f}ms{r['recomputed_tokens']:>8}"
          f"{max(r['detection_s'], default=0) * 1e3:>6.1f}ms{restart * 1e3:>7.1f}ms"
          f"{r['compiles_during_run']:>6}"
          f"{r['throughput_tok_s']:>7.0f}{r['completed']:>4}/{r['requests']:<3}"
          f"{r['tokens_match_fault_free']}")
  print("(restore: the slowest per-request restore; for the baseline, the whole restart)")
  ratios = {}
  for kind in ("aw", "ew"):
    t, g = runs[f"tarragon_{kind}"], runs[f"global_restart_{kind}"]
    phases = g["restart_phases"][0] if g["restart_phases"] else {}
    if not (t["in_flight"] and g["in_flight"]):
      ratios[kind] = None
      print(f"{kind.upper()} failure: no request was in flight at the fault; no ratio")
      continue
    ratios[kind] = dict(service_stall=g["service_stall_s"] / t["service_stall_s"],
                        max_request_gap=g["max_request_gap_s"] / t["max_request_gap_s"])
    print(f"{kind.upper()} failure, baseline / Tarragon: service stall "
          f"{ratios[kind]['service_stall']:.0f}x, max request gap "
          f"{ratios[kind]['max_request_gap']:.0f}x; baseline restart: " +
          ", ".join(f"{k[:-2]} {v:.3f}s" for k, v in phases.items() if k.endswith("_s")))
  tp = {}
  for r in records:
    if r["run"] == "throughput":
      tp.setdefault(r["variant"], []).append(r["throughput_tok_s"])
  med = {k: float(np.median(v)) for k, v in tp.items()}
  # Ratios within each repetition (the variants ran back to back), then their median: the
  # machine's drift between repetitions cancels.
  on_off = float(np.median(np.divide(tp["snapshots_on"], tp["snapshots_off"])))
  on_base = float(np.median(np.divide(tp["snapshots_on"], tp["global_restart"])))
  print(f"fault-free throughput (median of {cd.reps}): snapshots on {med['snapshots_on']:.0f}, "
        f"off {med['snapshots_off']:.0f}, baseline {med['global_restart']:.0f} tok/s; "
        f"median per-repetition ratio on/off {on_off:.3f}, Tarragon/baseline {on_base:.3f}")
  if "local_runtime" in tp:
    ratio = float(np.median(np.divide(tp["snapshots_on"], tp["local_runtime"])))
    print(f"process runtime / local runtime throughput: {ratio:.3f} (local "
          f"{med['local_runtime']:.0f} tok/s)")
  return dict(runs=list(runs.values()), stall_ratios=ratios, throughput_median_tok_s=med,
              throughput_on_off=on_off, throughput_tarragon_baseline=on_base)


if __name__ == "__main__":
  app.run(main)
