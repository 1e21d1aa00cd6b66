"""Multiple and concurrent failures: Tarragon recovery vs the global-restart baseline.

  python -m experiments.multi_failure --config=configs/multi_failure_tiny.py

Beyond the paper, which fails one worker at a time. On one workload (Poisson "Random" requests,
real time) it runs a fault-free pass, then every scenario of the config (a fault schedule: two
EWs at once, an AW and an EW at once, two failures a second apart, a failure while another
recovery is under way, the snapshot store and an AW at once, a hang plus a kill) once with
Tarragon and once with the baseline. Per run: the service stall and max request stall measured
from the first fault (`stall_summary`) and from each fault, recomputed tokens, requests
completed, whether every request's greedy tokens equal the fault-free run's, which faults
fired, what was declared failed, replacements that joined (or none, for want of a spare
device) and experts left without a replica; per scenario the baseline / Tarragon stall ratios.
The baseline holds `baseline_shadows` shadows (MegaScale: none) and no snapshot store, so a
store fault is ignored under it.

Faults fire at layer boundaries. The baseline's restart runs inside one engine step, with no
layer boundary in it, so a `when=recovery` fault never fires under the baseline; under Tarragon
it fires only if a layer boundary falls inside the recovery, which a hot spare can finish
within one step boundary. Faults that did not fire are reported. A run that raises (e.g. EWs
whose experts have no replica left and no spare device) is recorded with its error and the
other runs go on. Writes results.jsonl, summary.json, timeline_<run>.jsonl, multi_failure.png.
"""

from __future__ import annotations

import os
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX use: AW and EW cells are carved

import numpy as np  # noqa: E402
from absl import app, logging  # noqa: E402

import tarragon_jax as tj  # noqa: E402
from experiments import launch_config  # noqa: E402
from experiments import workload as wl  # noqa: E402
from tarragon_jax.checkpoint import save_checkpoint  # noqa: E402
from tarragon_jax.mesh.cells import CellPlan  # noqa: E402
from tarragon_jax.resilience.faults import parse_faults  # noqa: E402
from tarragon_jax.resilience.routing_table import RoutingTable  # noqa: E402
from tarragon_jax.serving.engine import Engine  # noqa: E402
from tarragon_jax.serving.metrics import compile_count, fault_stalls  # noqa: E402
from tarragon_jax.worker.placement import place  # noqa: E402

_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags("configs/multi_failure_tiny.py")
POLICIES = ("tarragon", "global_restart")


def _engine(cd, cfg, params, weights_dir, recovery: str) -> Engine:
  tarragon = recovery == "tarragon"
  ec = launch_config.engine_config(
      cd, shadows_per_expert=cd.shadows_per_expert if tarragon else cd.baseline_shadows,
      resilience=dict(recovery=recovery, snapshots=tarragon, weights_dir=weights_dir))
  engine = Engine(cfg, params, ec)
  engine.warm_up(None if cd.warm_all_buckets else [1, engine.bucket(cd.workload.prompt_len)])
  return engine


def _run(name: str, spec: str, recovery: str, cd, cfg, params, weights_dir, work, reference,
         workdir) -> tuple[dict, list]:
  """One real-time replay of `work` under the fault schedule `spec`; its record and outputs."""
  engine = _engine(cd, cfg, params, weights_dir, recovery)
  engine.arm_faults(parse_faults(spec))
  compiles, error = compile_count(), None
  try:
    result = wl.replay(engine, work, timeout_s=cd.run_timeout_s)
    engine.recovery.wait_for_replacements()
  except Exception as err:  # noqa: BLE001 - recorded; the other scenarios still run
    logging.exception("run %s failed", name)
    error = repr(err)
    result = wl.ReplayResult(sorted(engine.requests), engine.t0, time.perf_counter())
  finally:
    engine.close()
  outputs = [engine.tokens(r) for r in result.ids]
  events, tl, s = result.events(engine), engine.timeline, engine.summary()
  arrivals, faults = result.arrivals(engine), tl.of("fault")

  def rel(t: float) -> float:
    return round(t - result.start, 4)

  record = dict(
      run=name, mode=recovery, faults=spec, error=error, **result.summary(engine),
      compiles_during_run=compile_count() - compiles,
      tokens_match_fault_free=None if reference is None else outputs == reference,
      fired=[dict(worker=f["worker"], kind=f["kind"], t=rel(f["t"])) for f in faults],
      not_fired=[f"{f.kind}:{f.worker}" for f in engine.injector.pending],
      ignored=[e["worker"] for e in tl.of("fault_ignored")],
      declared=[dict(worker=e["worker"], how=e["how"], detection_s=e["detection_s"], t=rel(e["t"]))
                for e in tl.of("declared_failed")],
      replacements_joined=[dict(worker=e["worker"], t=rel(e["t"]), build_s=e["build_s"],
                                source=e["source"]) for e in tl.of("replacement_joined")],
      no_spare=[e["worker"] for e in tl.of("no_spare")],
      replacement_failed=[e["worker"] for e in tl.of("replacement_failed")],
      experts_unreachable=sum(e["pairs"] for e in tl.of("experts_unreachable")),
      **{k: s[k] for k in ("restores", "reprefills", "recomputed_tokens", "table_epoch")},
      restart_phases=s.get("restarts", []))
  if faults:
    per_fault = fault_stalls(events, tl, arrivals)
    record.update(per_fault[0][1])
    record["per_fault"] = [dict(worker=f["worker"], kind=f["kind"], t=rel(f["t"]), **s)
                           for f, s in per_fault]
    record["worst_service_stall_s"] = max(p["service_stall_s"] for p in record["per_fault"])
  tl.write_jsonl(os.path.join(workdir, f"timeline_{name}.jsonl"), result.start)
  return record, outputs


def _spares(cd) -> int:
  """Devices left for replacements (and the baseline's rebuild) after the cells are carved."""
  return jax.device_count() - CellPlan(cd.num_aw, cd.num_ew).devices_needed


def unreachable_pairs(cd, cfg) -> dict[str, int]:
  """For each pair of EWs: (layer, expert) pairs left with no replica if both fail at once."""
  table = RoutingTable.from_placement(place(cfg.num_layers, cfg.num_experts, cd.num_ew, None,
                                            cd.shadows_per_expert))
  return {f"ew{a}+ew{b}": len(table.without_ew(a).without_ew(b).unreachable())
          for a in range(cd.num_ew) for b in range(a + 1, cd.num_ew)}


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
  only = [n.strip() for n in cd.only.split(",") if n.strip()]
  unknown = sorted(set(only) - set(cd.scenarios))
  if unknown:
    raise ValueError(f"only: unknown scenarios {unknown}; the config has {list(cd.scenarios)}")
  scenarios = {n: spec.format(t=cd.fault_at_s, t2=cd.fault_at_s + cd.gap_s)
               for n, spec in cd.scenarios.items() if not only or n in only}

  start = time.perf_counter()
  base, reference = _run("fault_free", "", "tarragon", cd, cfg, params, weights_dir, work, None,
                         workdir)
  base["scenario"] = "none"
  records = [base]
  for scenario, spec in scenarios.items():
    for recovery in POLICIES:
      launch_config.progress("scenario %s (%s), %s", scenario, spec, recovery)
      rec, _ = _run(f"{scenario}_{recovery}", spec, recovery, cd, cfg, params, weights_dir, work,
                    reference, workdir)
      rec["scenario"] = scenario
      records.append(rec)
  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  summary = _report(records, scenarios, cd)
  summary["unreachable_if_both_fail"] = unreachable_pairs(cd, cfg)
  summary["spare_devices"] = _spares(cd)
  summary["wall_s"] = time.perf_counter() - start
  summary["plot"] = _plot(os.path.join(workdir, "multi_failure.png"), records, scenarios, cd)
  launch_config.write_summary(workdir, summary, cd)
  print(f"-> {workdir}")


def _ratio(a: float, b: float) -> float | None:
  return a / b if b > 0 else None


def _report(records: list[dict], scenarios: dict, cd) -> dict:
  runs = {(r["scenario"], r["mode"]): r for r in records}
  print(f"\n{len(scenarios)} scenarios, {cd.num_aw} AW + {cd.num_ew} EW, "
        f"{_spares(cd)} spare devices; first fault at {cd.fault_at_s} s")
  print(f"{'scenario':<16}{'policy':<9}{'fired':>6}{'service':>9}{'max req':>9}{'worst':>9}"
        f"{'recomp.':>8}{'repl.':>6}{'done':>7}  {'tokens ==':<11}notes")
  print(f"{'':<16}{'':<9}{'':>6}{'stall':>9}{'stall':>9}{'stall':>9}{'tokens':>8}{'':>6}"
        f"{'':>7}  {'fault-free':<11}")
  ratios = {}
  for scenario in scenarios:
    for mode in POLICIES:
      r = runs[(scenario, mode)]
      notes = [f"not fired: {', '.join(r['not_fired'])}"] if r["not_fired"] else []
      notes += [f"ignored: {', '.join(r['ignored'])}"] if r["ignored"] else []
      notes += [f"no spare for {', '.join(r['no_spare'])}"] if r["no_spare"] else []
      if r["experts_unreachable"]:
        notes.append(f"{r['experts_unreachable']} experts had no replica")
      notes += [f"{len(r['restart_phases'])} restart(s)"] if r["restart_phases"] else []
      notes += [f"error: {r['error']}"] if r["error"] else []
      fired = f"{len(r['fired'])}/{len(r['fired']) + len(r['not_fired'])}"
      print(f"{scenario:<16}{mode[:8]:<9}{fired:>6}"
            f"{r.get('service_stall_s', 0) * 1e3:>7.1f}ms"
            f"{r.get('max_request_stall_s', 0) * 1e3:>7.1f}ms"
            f"{r.get('worst_service_stall_s', 0) * 1e3:>7.1f}ms{r['recomputed_tokens']:>8}"
            f"{len(r['replacements_joined']):>6}{r['completed']:>4}/{r['requests']:<3}  "
            f"{r['tokens_match_fault_free']!s:<11}{'; '.join(notes)}")
    t, g = runs[(scenario, "tarragon")], runs[(scenario, "global_restart")]
    if not (t.get("held") and g.get("held")):
      ratios[scenario] = None
      continue
    ratios[scenario] = dict(
        service_stall=_ratio(g["service_stall_s"], t["service_stall_s"]),
        max_request_stall=_ratio(g["max_request_stall_s"], t["max_request_stall_s"]),
        worst_service_stall=_ratio(g["worst_service_stall_s"], t["worst_service_stall_s"]))
  print("(stalls from the first fault; worst: the longest service stall after any fault; "
        "repl.: replacement workers that joined)")
  for k, v in ratios.items():
    print(f"{k:<16}baseline / Tarragon: " + (", ".join(
        f"{m.replace('_', ' ')} {x:.0f}x" if x else f"{m.replace('_', ' ')} -"
        for m, x in v.items()) if v else "no request waited at the first fault"))
  return dict(runs=records, stall_ratios=ratios,
              every_request_completed=all(r["completed"] == r["requests"] for r in records),
              all_tokens_match_fault_free=all(r["tokens_match_fault_free"] for r in records[1:]))


def _plot(path: str, records: list[dict], scenarios: dict, cd) -> str:
  """Grouped bars: service stall (first fault) per scenario, Tarragon vs baseline, log scale."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = {(r["scenario"], r["mode"]): r for r in records}
  fig, ax = plt.subplots(figsize=(8, 4))
  x = np.arange(len(scenarios))
  top = 1.0
  for i, mode in enumerate(POLICIES):
    stalls = [runs[(s, mode)].get("service_stall_s", 0.0) * 1e3 for s in scenarios]
    ax.bar(x + (i - 0.5) * 0.4, stalls, 0.4, label=mode.replace("_", " "))
    top = max([top, *stalls])
  ax.set_xticks(x, list(scenarios), rotation=20, ha="right")
  ax.set_yscale("log")
  ax.set_ylim(top=top * 10)  # room for the legend above the bars
  ax.set_ylabel("service stall after the first fault (ms, log)")
  ax.set_title(f"multiple failures, {cd.num_aw} AW + {cd.num_ew} EW, Poisson "
               f"{cd.workload.rate:g} req/s", fontsize=10)
  ax.grid(axis="y", alpha=0.3, which="both")
  ax.legend(ncol=2, loc="upper center")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


if __name__ == "__main__":
  app.run(main)
