"""The main job: an AW kill, an EW kill and an EW hang, Tarragon recovery vs the global restart.

  python -m experiments.failover [--config=configs/failover_tiny.py] [--workdir=DIR]

On one workload (Poisson "Random" requests, replayed in real time) it runs, for each policy
(Tarragon recovery, the MegaScale-like global-restart baseline): a fault-free pass, one AW
kill, one EW kill and one EW hang (found by probes, not by a closed connection; its `detect`
column is the detection delay). For each run it reports the service stall (the longest time with
zero output tokens after the fault), the max request stall (the extra wait of one in-flight
request beyond its usual token gap), recomputed tokens, throughput and whether every request's
greedy tokens equal the fault-free run's; then fault-free closed-loop throughput of Tarragon
(snapshots on and off) vs the baseline in interleaved repetitions, on engines rebuilt every
`rebuild_every` repetitions. `--config.runtime=process` runs every worker as its own OS
process (faults are SIGKILL and SIGSTOP), and adds the local runtime to the throughput comparison;
`--config.runtime=ray` runs them as actors on a Ray cluster (by default a 2-node cluster started
for the run, in a network namespace of its own) and adds the loss of a whole node.

Writes to the workdir: summary.json ({"runs": [{"mode", "fault", "requests", "completed",
"service_stall_s", "max_request_stall_s", "recomputed_tokens", "throughput_tok_s",
"tokens_match_fault_free", ...}], "stall_ratios", "throughput_*"}), results.jsonl (every run
and throughput repetition), timeline_<mode>_<fault>.jsonl (failure and recovery events),
timeline.png (output tokens/s over time through each failure, the paper's Fig. 9) and
stalls.png (stalls per failure kind and policy, log scale).
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
from tarragon_jax.resilience.faults import parse_faults  # noqa: E402
from tarragon_jax.serving.engine import Engine  # noqa: E402
from tarragon_jax.serving.metrics import compile_count, fault_stalls  # noqa: E402

_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags("configs/failover_tiny.py")
_BIN_S = 0.25
_ZOOM_S, _FINE_BIN_S = 0.2, 0.02  # timeline.png's second row: +-0.2 s in 20 ms bins
MODES = ("tarragon", "global_restart")
FAULTS = ("none", "aw", "ew", "ew_hang")
KINDS = {"aw": "AW kill", "ew": "EW kill", "ew_hang": "EW hang",  # the failure rows
         "node": "node loss"}  # (on a Ray cluster)


def _faults(cd) -> tuple[str, ...]:
  """The runs' faults: on a Ray cluster, also the loss of a whole node."""
  return FAULTS + (("node",) if cd.runtime == "ray" else ())


def _engine(cd, cfg, params, weights_dir, recovery: str, snapshots: bool, spawner,
            fault_free: bool = False, transport: str | None = None) -> Engine:
  """An engine on this process's devices (`spawner` None) or on worker processes.

  `fault_free`: it only serves the throughput batch, so only its decode step and the prompts'
  prefill bucket are compiled up front (a rebuild then takes ~0.05 s instead of ~0.3 s).
  `transport`: the worker processes' data plane, if not the config's.
  """
  if transport is not None:
    cd = cd.copy_and_resolve_references()
    cd.transport = transport
  # The MegaScale-like baseline holds no shadow experts: it restarts everything on a failure.
  shadows = cd.shadows_per_expert if recovery == "tarragon" else 0
  ec = launch_config.engine_config(cd, shadows_per_expert=shadows, resilience=dict(
      recovery=recovery, snapshots=snapshots, weights_dir=weights_dir))
  engine = Engine(cfg, params, ec,
                  runtime=launch_config.make_runtime(cd, spawner, _CACHE.value))
  if fault_free:
    engine.warm_up([1, engine.bucket(cd.workload.prompt_len)])
  else:
    engine.warm_up(None if cd.warm_all_buckets else [1, 16])  # before measuring
  return engine


def _run(cd, cfg, params, weights_dir, work, reference, mode: str, fault: str, workdir,
         spawner) -> tuple[dict, list, np.ndarray]:
  """One real-time replay of `work` with `fault` (in `FAULTS`) under policy `mode`."""
  engine = _engine(cd, cfg, params, weights_dir, mode, mode == "tarragon", spawner)
  spec = {"none": "", "aw": cd.aw_fault, "ew": cd.ew_fault, "ew_hang": cd.hang_fault,
          "node": cd.node_fault}[fault]
  engine.arm_faults(parse_faults(f"{spec}@t={cd.fault_at_s}") if spec else ())
  compiles = compile_count()
  result = wl.replay(engine, work)
  compiled = compile_count() - compiles
  engine.recovery.wait_for_replacements()
  engine.close()
  outputs = [engine.tokens(r) for r in result.ids]
  events = result.events(engine)
  times = np.sort([e.time - result.start for e in events])
  s = engine.summary()
  record = dict(mode=mode, fault=fault, fault_spec=spec or None, **result.summary(engine),
                service_stall_s=None, max_request_stall_s=None,
                recomputed_tokens=s["recomputed_tokens"],
                longest_output_gap_s=float(np.max(np.diff(times), initial=0.0)),
                compiles_during_run=compiled,
                tokens_match_fault_free=True if reference is None else outputs == reference)
  faults = engine.timeline.of("fault")
  if faults:
    record.update(fault_stalls(events, engine.timeline, result.arrivals(engine))[0][1])
    record.update({k: s[k] for k in ("detection_s", "restores", "reprefills", "restore_bytes",
                                     "restore_s_max", "recomputed_token_layers",
                                     "uncommitted_tail_tokens")})
    record["restart_phases"] = s.get("restarts", [])
    joined = engine.timeline.of("replacement_joined")
    record["replacement_joined_after_s"] = joined[0]["t"] - faults[0]["t"] if joined else None
    engine.timeline.write_jsonl(os.path.join(workdir, f"timeline_{mode}_{fault}.jsonl"),
                                result.start)
  return record, outputs, times


def _throughput(cd, cfg, params, weights_dir, spawner) -> list[dict]:
  """Closed loop: every request at t=0; tokens/s of each variant, interleaved repetitions.

  A run ends when its tokens are out and their KV is in the snapshot store's host tier (the
  store applies steps in batches: the run's last batch is timed); then, not timed (`settle_s`),
  the durable tier's writes land, so that they are not charged to the next variant. Every
  `rebuild_every` repetitions the engines are built afresh (in the other order): one engine
  instance can run a few percent faster or slower than an identical one for its whole life
  (measured: two identical baseline engines 0.92-1.0 apart over 30 repetitions), and rebuilding
  spreads that over every variant instead of biasing one comparison.
  """
  variants = {"snapshots_on": ("tarragon", True, spawner, None),  # (..., transport)
              "snapshots_off": ("tarragon", False, spawner, None),
              "global_restart": ("global_restart", False, spawner, None)}
  if spawner is not None:  # the local runtime, and the other transport between processes
    variants["local_runtime"] = ("tarragon", True, None, None)
    other = "transfer" if cd.transport == "zmq" else "zmq"
    variants[f"{other}_transport"] = ("tarragon", True, spawner, other)
  rng = np.random.default_rng(cd.seed + 1)
  records, engines, builds = [], {}, 0
  phase_start = time.perf_counter()
  try:
    for rep in range(cd.reps):
      if rep:
        left = (time.perf_counter() - phase_start) / rep * (cd.reps - rep)
        print(f"  throughput rep {rep + 1}/{cd.reps} (about {left:.0f} s left)", flush=True)
      else:
        print(f"fault-free throughput: {cd.reps} repetitions of {len(variants)} variants",
              flush=True)
      if not engines or (cd.rebuild_every and rep % cd.rebuild_every == 0):
        _close(engines)
        names = list(variants) if builds % 2 == 0 else list(variants)[::-1]
        engines = {k: _engine(cd, cfg, params, weights_dir, *variants[k][:3], fault_free=True,
                              transport=variants[k][3]) for k in names}
        builds += 1
      order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
      prompts = rng.integers(0, cfg.vocab_size, (cd.throughput_requests, cd.workload.prompt_len))
      for name in order:
        engine = engines[name]
        bytes0, steps0 = _driver_bytes(engine), engine.iteration
        start = time.perf_counter()
        outs = engine.generate(prompts.tolist(), cd.throughput_output_len)
        engine.settle(durable=False)
        seconds = time.perf_counter() - start
        engine.settle()
        records.append(dict(run="throughput", variant=name, rep=rep, seconds=seconds,
                            settle_s=time.perf_counter() - start - seconds,
                            throughput_tok_s=sum(map(len, outs)) / seconds,
                            driver_bytes_per_step=_per_step(
                                bytes0, _driver_bytes(engine), engine.iteration - steps0)))
        engine.release()  # a benchmark's engines would otherwise keep every request they served
        logging.info("throughput %s rep %d: %.0f tok/s", name, rep,
                     records[-1]["throughput_tok_s"])
  finally:
    _close(engines)
  return records


# The messages that would carry activations (hidden states, expert outputs) if any passed
# through the driver: those of the phase-by-phase datapath both ways, and the replies of a
# worker's own step (a `run_step` request carries tokens and sampling settings).
DATAPATH_METHODS = ("attend", "attend:reply", "run_layer", "run_layer:reply", "combine",
                    "combine:reply", "run_step:reply", "serve_step", "serve_step:reply")


def _driver_bytes(engine) -> dict | None:
  """The array bytes that passed through the driver per worker method (process runtime)."""
  return engine.runtime.driver_bytes() if engine.runtime.remote else None


def _per_step(before: dict | None, after: dict | None, steps: int) -> dict | None:
  """Array bytes per step through the driver between two `_driver_bytes`: activations (the
  floating-point arrays of the datapath's messages), the rest of the datapath's (routing
  counts, tokens), and every other message's (prompts, sampling state, KV, tables)."""
  if after is None or not steps:
    return None
  delta = {m: [t - before.get(m, (0, 0))[i] for i, t in enumerate(v)] for m, v in after.items()}
  datapath = [delta.get(m, [0, 0]) for m in DATAPATH_METHODS]
  return dict(activations=sum(f for _, f in datapath) / steps,
              datapath_other=sum(t - f for t, f in datapath) / steps,
              other=sum(t for m, (t, _) in delta.items() if m not in DATAPATH_METHODS) / steps)


def _close(engines: dict):
  for engine in engines.values():
    engine.close()
  engines.clear()


def main(argv):
  del argv
  cd = _CONFIG.value
  launch_config.isolate_network(cd)  # (a local Ray cluster: this run in a namespace of its own)
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
    runs, series = _runs(cd, cfg, params, weights_dir, work, workdir, spawner)
    throughput = _throughput(cd, cfg, params, weights_dir, spawner)
  finally:
    if spawner is not None:
      spawner.close()
  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"),
                            [dict(run=f"{r['mode']}_{r['fault']}", **r) for r in runs]
                            + throughput)
  summary = _report(runs, throughput, cd)
  summary["figures"] = _figures(workdir, runs, series, cd)
  launch_config.write_summary(workdir, summary, cd)
  print(f"-> {workdir}")


def _runs(cd, cfg, params, weights_dir, work, workdir, spawner):
  """Every (mode, fault) run; the first (Tarragon, no fault) is the reference for the rest."""
  runs, series, reference = [], {}, None
  plan = [(m, f) for f in _faults(cd) for m in MODES]
  start = time.perf_counter()
  for k, (mode, fault) in enumerate(plan):
    print(f"[{k + 1}/{len(plan)}] {mode}, fault: {fault} "
          f"({time.perf_counter() - start:.0f} s so far)", flush=True)
    record, outputs, times = _run(cd, cfg, params, weights_dir, work, reference, mode, fault,
                                  workdir, spawner)
    if reference is None:
      reference = outputs
    runs.append(record)
    series[(mode, fault)] = times
    if fault != "none":
      print(f"      service stall {record['service_stall_s'] * 1e3:.1f} ms, max request stall "
            f"{record['max_request_stall_s'] * 1e3:.1f} ms, tokens == fault-free: "
            f"{record['tokens_match_fault_free']}", flush=True)
  return runs, series


def _duration(seconds: float | None) -> str:
  """A measured duration in a unit that shows it ("-": nothing was measured)."""
  if seconds is None:
    return "-"
  if seconds < 1e-3:
    return f"{seconds * 1e6:.0f}us"
  return f"{seconds * 1e3:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _report(runs: list[dict], throughput: list[dict], cd) -> dict:
  """Prints the table and the ratios; returns the summary."""
  print(f"\n{'mode':<16}{'fault':<9}{'service':>9}{'max req':>9}{'recomp.':>8}{'detect':>8}"
        f"{'restore':>9}{'tok/s':>7}{'done':>8}  tokens ==")
  print(f"{'':<25}{'stall':>9}{'stall':>9}{'tokens':>8}{'':>8}{'':>9}{'':>7}{'':>8}  fault-free")

  ms = _duration
  for r in runs:
    restart = (r["restart_phases"][0]["total_s"] if r.get("restart_phases")
               else r.get("restore_s_max") if r.get("restores") else None)
    print(f"{r['mode']:<16}{r['fault']:<9}{ms(r['service_stall_s']):>9}"
          f"{ms(r['max_request_stall_s']):>9}{r['recomputed_tokens']:>8}"
          f"{ms(max(r['detection_s']) if r.get('detection_s') else None):>8}"
          f"{ms(restart):>9}{r['throughput_tok_s']:>7.0f}"
          f"{r['completed']:>4}/{r['requests']:<3}  {r['tokens_match_fault_free']}")
  print("(detect: from when the failed worker's data was due to its declaration; restore: "
        "Tarragon's slowest per-request restore, for the baseline the whole restart; -: nothing "
        "of the kind happened)")
  by = {(r["mode"], r["fault"]): r for r in runs}
  ratios = {}
  for kind in [k for k in KINDS if ("tarragon", k) in by]:
    t, g = by["tarragon", kind], by["global_restart", kind]
    if not (t["held"] and g["held"]):
      ratios[kind] = None
      print(f"{KINDS[kind]}: no request waited at the fault; no ratio")
      continue
    # None where Tarragon's value is 0 (no request waited beyond its usual token gap).
    ratios[kind] = {k: g[k] / t[k] if t[k] > 0 else None
                    for k in ("service_stall_s", "max_request_stall_s")}
    shown = {k: "n/a (Tarragon: none)" if r is None else f"{r:.0f}x"
             for k, r in ratios[kind].items()}
    phases = g["restart_phases"][0] if g["restart_phases"] else {}
    print(f"{KINDS[kind]}, baseline / Tarragon: service stall "
          f"{shown['service_stall_s']}, max request stall {shown['max_request_stall_s']}; "
          "baseline restart: "
          + ", ".join(f"{k[:-2]} {v:.3f}s" for k, v in phases.items() if k.endswith("_s")))
  tp = {}
  for r in throughput:
    tp.setdefault(r["variant"], []).append(r["throughput_tok_s"])
  med = {k: float(np.median(v)) for k, v in tp.items()}
  # Ratios within each repetition (the variants ran back to back), then their median: the
  # machine's drift between repetitions cancels.
  on_off, on_off_ci = _median_ratio(tp["snapshots_on"], tp["snapshots_off"], cd.seed)
  on_base, on_base_ci = _median_ratio(tp["snapshots_on"], tp["global_restart"], cd.seed)
  # Without snapshots Tarragon differs from the baseline fault-free only by its idle shadow
  # experts (and its idle detection and recovery machinery): their cost, within the noise.
  off_base, off_base_ci = _median_ratio(tp["snapshots_off"], tp["global_restart"], cd.seed)

  def with_ci(r, ci):
    return f"{r:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"

  print(f"fault-free closed-loop throughput (median of {cd.reps}): Tarragon "
        f"{med['snapshots_on']:.0f} (snapshots off {med['snapshots_off']:.0f}), baseline "
        f"{med['global_restart']:.0f} tok/s\n  Tarragon / baseline "
        f"{with_ci(on_base, on_base_ci)} (median per-repetition ratio)\n  snapshots on / off "
        f"{with_ci(on_off, on_off_ci)}\n"
        f"  Tarragon without snapshots / baseline (the cost of idle shadow experts) "
        f"{with_ci(off_base, off_base_ci)}")
  out = dict(runs=runs, stall_ratios=ratios, throughput_median_tok_s=med,
             throughput_tarragon_baseline=on_base, throughput_tarragon_baseline_ci=on_base_ci,
             throughput_snapshots_on_off=on_off, throughput_snapshots_on_off_ci=on_off_ci,
             throughput_snapshots_off_baseline=off_base,
             throughput_snapshots_off_baseline_ci=off_base_ci)
  if "local_runtime" in tp:
    out["throughput_process_local"] = float(np.median(np.divide(tp["snapshots_on"],
                                                                tp["local_runtime"])))
    print(f"{cd.runtime} runtime / local runtime throughput: {out['throughput_process_local']:.3f} "
          f"(local {med['local_runtime']:.0f} tok/s)")
    other = next(k for k in tp if k.endswith("_transport"))
    out["throughput_transports"] = float(np.median(np.divide(tp[other], tp["snapshots_on"])))
    print(f"data plane {other.removesuffix('_transport')} / {cd.transport} throughput: "
          f"{out['throughput_transports']:.3f} (median per-repetition ratio)")
  per_step = [r["driver_bytes_per_step"] for r in throughput
              if r["variant"] == "snapshots_on" and r.get("driver_bytes_per_step")]
  if per_step:
    out["driver_bytes_per_step"] = {k: float(np.median([p[k] for p in per_step]))
                                    for k in per_step[0]}
    b = out["driver_bytes_per_step"]
    print(f"through the driver per step (Tarragon): activation bytes {b['activations']:.0f}; "
          f"sampled tokens and routing counts {b['datapath_other']:.0f} B; step inputs "
          f"(tokens, sampling settings), KV and control {b['other']:.0f} B")
  return out


def _median_ratio(a: list[float], b: list[float], seed: int) -> tuple[float, list[float]]:
  """The median of the per-repetition ratios a / b and its 95% bootstrap interval (2000
  resamples of the repetitions): on a noisy host a single median can sit a few percent off."""
  r = np.divide(a, b)
  boot = np.median(np.random.default_rng(seed).choice(r, (2000, len(r))), axis=1)
  return float(np.median(r)), [float(x) for x in np.percentile(boot, [2.5, 97.5])]


def _rate(times: np.ndarray, start: float, stop: float, bin_s: float):
  """Output tokens/s in bins of `bin_s` over [start, stop): (bin starts, rates)."""
  edges = np.arange(start, stop + bin_s / 2, bin_s)
  counts, _ = np.histogram(times, bins=edges)
  return edges[:-1], counts / bin_s


def _figures(workdir: str, runs: list[dict], series: dict, cd) -> list[str]:
  """timeline.png and stalls.png."""
  return [_timeline_figure(workdir, series, cd), _stalls_figure(workdir, runs, cd)]


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt

  return plt


def _scale(cd) -> str:
  """The run's scale, for a figure's title."""
  m = cd.model
  return (f"{m.num_layers}-layer MoE (hidden {m.hidden_size}, {m.num_experts} experts top-"
          f"{m.top_k}), {cd.num_aw} AW + {cd.num_ew} EW cells, {cd.runtime} runtime")


def _timeline_figure(workdir: str, series: dict, cd) -> str:
  """timeline.png: tokens/s through each failure, the whole run and +-0.2 s around the fault
  at a finer bin, where Tarragon's few-millisecond stall shows."""
  plt = _pyplot()
  scale = _scale(cd)
  t0, zoom, fine = cd.fault_at_s, _ZOOM_S, _FINE_BIN_S
  fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharey="row")
  end = max(series[k].max() for k in series) + _BIN_S
  for col, kind in enumerate(("aw", "ew")):
    for row, (lo, hi, bin_s) in enumerate(((0.0, end, _BIN_S), (t0 - zoom, t0 + zoom, fine))):
      ax = axes[row, col]
      for mode, style in zip(MODES, ("-", "--")):
        ax.plot(*_rate(series[mode, kind], lo, hi, bin_s), style, drawstyle="steps-post",
                label="Tarragon" if mode == "tarragon" else "global restart")
      ax.plot(*_rate(series["tarragon", "none"], lo, hi, bin_s), ":", color="gray",
              drawstyle="steps-post", label="no failure")
      ax.axvline(t0, color="red", lw=0.8, label=f"{kind.upper()} killed")
      ax.set_xlim(lo, hi)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
      if row == 0:
        ax.set_title(f"{kind.upper()} killed at t = {t0:g} s")
        ax.set_xlabel("time since start (s)")
      else:
        ax.set_title(f"the same, {zoom * 1e3:.0f} ms either side of the kill")
        ax.set_xlabel(f"time since start (s; {fine * 1e3:.0f} ms bins)")
  axes[0, 0].set_ylabel(f"output tokens/s ({_BIN_S} s bins)")
  axes[1, 0].set_ylabel(f"output tokens/s ({fine * 1e3:.0f} ms bins)")
  fig.suptitle(f"Output through a failure: Tarragon vs a global restart\n{scale}", fontsize=11)
  fig.tight_layout()
  timeline = os.path.join(workdir, "timeline.png")
  fig.savefig(timeline, dpi=120)
  plt.close(fig)
  return timeline


def _stalls_figure(workdir: str, runs: list[dict], cd) -> str:
  """stalls.png: service and max request stall per failure, values and ratios written on
  them."""
  plt = _pyplot()
  scale = _scale(cd)
  by = {(r["mode"], r["fault"]): r for r in runs}
  kinds = [k for k in KINDS if ("tarragon", k) in by]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, (key, what) in zip(axes, (("service_stall_s", "service stall"),
                                    ("max_request_stall_s", "max request stall"))):
    x = np.arange(len(kinds))
    values = {mode: [by[mode, k][key] for k in kinds] for mode in MODES}
    for i, mode in enumerate(MODES):
      ms = [1e3 * (v or 0.0) for v in values[mode]]
      bars = ax.bar(x + (i - 0.5) * 0.4, np.maximum(ms, 1e-2), 0.4,
                    label="Tarragon" if mode == "tarragon" else "global restart")
      ax.bar_label(bars, labels=[_duration(v) for v in values[mode]], fontsize=8)
    for j, (t, g) in enumerate(zip(values["tarragon"], values["global_restart"])):
      if t and g:  # the ratio above the pair
        ax.annotate(f"{g / t:.0f}x", (x[j], 1e3 * g * 2.2), ha="center", fontsize=10,
                    fontweight="bold")
    ax.set_xticks(x, [KINDS[k] for k in kinds])
    ax.set_yscale("log")
    shown = [1e3 * v for vs in values.values() for v in vs if v]
    if shown:  # every bar shows, and the ratios above
      ax.set_ylim(min(shown) / 3, max(shown) * 8)
    ax.set_ylabel(f"{what} (ms, log scale)")
    ax.set_title(what)
    ax.grid(alpha=0.3, axis="y")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="upper right", ncol=2)
  fig.suptitle(f"Stalls per failure (baseline / Tarragon above each pair)\n{scale}",
               fontsize=11, x=0.4)
  fig.tight_layout(rect=(0, 0, 1, 0.95))
  stalls = os.path.join(workdir, "stalls.png")
  fig.savefig(stalls, dpi=120)
  plt.close(fig)
  return stalls


if __name__ == "__main__":
  app.run(main)
