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
from tarragon_jax.serving import workload as wl  # noqa: E402
from tarragon_jax.serving.engine import Engine, EngineConfig, ResilienceConfig  # noqa: E402
from tarragon_jax.serving.metrics import compile_count, stall_summary  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/resilience_tiny.py", "Config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; default: the config's workdir.")
_CACHE = flags.DEFINE_string(
    "compile_cache", launch_config.DEFAULT_COMPILE_CACHE,
    "Persistent compilation cache directory ('' = off). Both policies get it.")
_BIN_S = 0.25


def _engine(cd, cfg, params, weights_dir, recovery: str, snapshots: bool) -> Engine:
  rc = ResilienceConfig(recovery=recovery, snapshots=snapshots, weights_dir=weights_dir,
                        flush_interval_s=cd.flush_interval_s,
                        detection=DetectionConfig(probe_interval_s=cd.probe_interval_s))
  plan = CellPlan(cd.num_aw, cd.num_ew)
  engine = Engine(cfg, params, EngineConfig(plan=plan, slots_per_aw=cd.slots_per_aw,
                                            shadows_per_expert=cd.shadows_per_expert,
                                            resilience=rc))
  engine.warm_up([1, 16])  # every executable serving and recovery use, before measuring
  return engine


def _failure_run(name, cd, cfg, params, weights_dir, work, reference, recovery, fault, workdir):
  engine = _engine(cd, cfg, params, weights_dir, recovery, snapshots=recovery == "tarragon")
  engine.arm_faults(parse_faults(f"{fault}@t={cd.fault_at_s}") if fault else ())
  compiles = compile_count()
  result = wl.replay(engine, work)
  compiled = compile_count() - compiles
  engine.recovery.wait_for_replacements()
  engine.close()
  outputs = [engine.tokens(r) for r in result.ids]
  events = result.events(engine)
  record = dict(run=name, mode=recovery, fault=fault.split(":")[1][:2] if fault else "none",
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


def _throughput(cd, cfg, params, weights_dir) -> list[dict]:
  """Closed loop: every request at t=0; tokens/s of each variant, interleaved repetitions."""
  variants = {"snapshots_on": ("tarragon", True), "snapshots_off": ("tarragon", False),
              "global_restart": ("global_restart", False)}
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

  records, series = [], {}
  base, outputs, _ = _failure_run("fault_free", cd, cfg, params, weights_dir, work, None,
                                  "tarragon", "", workdir)
  records.append(base)
  for fault in (cd.aw_fault, cd.ew_fault):
    for recovery in ("tarragon", "global_restart"):
      name = f"{recovery}_{fault.split(':')[1]}"
      logging.info("run %s (%s at t=%.1f s)", name, fault, cd.fault_at_s)
      rec, _, times = _failure_run(name, cd, cfg, params, weights_dir, work, outputs, recovery,
                                   fault, workdir)
      records.append(rec)
      counts, edges = np.histogram(times, bins=np.arange(0.0, times.max() + 2 * _BIN_S, _BIN_S))
      series[name] = (list(edges[:-1]), list(counts / _BIN_S))
  records += _throughput(cd, cfg, params, weights_dir)

  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  plot = launch_config.save_line_plot(
      os.path.join(workdir, "throughput.png"), series, xlabel="time since start (s)",
      ylabel="output tokens/s", title=f"failure at t = {cd.fault_at_s} s")
  summary = _report(records, cd)
  summary["plot"] = plot
  launch_config.write_summary(workdir, summary, cd)
  print(f"-> {workdir}")


def _report(records: list[dict], cd) -> dict:
  runs = {r["run"]: r for r in records if r["run"] != "throughput"}
  print(f"\n{'run':<26}{'service stall':>15}{'max req stall':>15}{'recomputed':>12}"
        f"{'detect':>9}{'tok/s':>8}{'done':>7}  tokens == fault-free")
  for name, r in runs.items():
    if r["fault"] == "none":
      continue
    print(f"{name:<26}{r['service_stall_s']:>14.3f}s{r['max_request_stall_s']:>14.3f}s"
          f"{r['recomputed_tokens']:>12}{max(r['detection_s'], default=0) * 1e3:>7.1f}ms"
          f"{r['throughput_tok_s']:>8.0f}{r['completed']:>4}/{r['requests']:<3}"
          f"{r['tokens_match_fault_free']}")
  ratios = {}
  for kind in (cd.aw_fault, cd.ew_fault):
    worker = kind.split(":")[1]
    t, g = runs[f"tarragon_{worker}"], runs[f"global_restart_{worker}"]
    ratios[worker[:2]] = dict(
        service_stall=g["service_stall_s"] / max(t["service_stall_s"], 1e-9),
        max_request_stall=g["max_request_stall_s"] / max(t["max_request_stall_s"], 1e-9))
    phases = g["restart_phases"][0] if g["restart_phases"] else {}
    print(f"{worker[:2].upper()} failure, baseline / Tarragon: service stall "
          f"{ratios[worker[:2]]['service_stall']:.0f}x, max request stall "
          f"{ratios[worker[:2]]['max_request_stall']:.0f}x; baseline restart phases: " +
          ", ".join(f"{k[:-2]} {v:.3f}s" for k, v in phases.items() if k.endswith("_s")))
  tp = {}
  for r in records:
    if r["run"] == "throughput":
      tp.setdefault(r["variant"], []).append(r["throughput_tok_s"])
  med = {k: float(np.median(v)) for k, v in tp.items()}
  print(f"fault-free throughput (median of {cd.reps}): snapshots on {med['snapshots_on']:.0f}, "
        f"off {med['snapshots_off']:.0f}, baseline {med['global_restart']:.0f} tok/s; "
        f"on/off {med['snapshots_on'] / med['snapshots_off']:.3f}, "
        f"Tarragon/baseline {med['snapshots_on'] / med['global_restart']:.3f}")
  return dict(runs=list(runs.values()), stall_ratios=ratios, throughput_median_tok_s=med)


if __name__ == "__main__":
  app.run(main)
