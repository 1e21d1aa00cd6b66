"""Fault-free TTFT, TBT and throughput vs arrival rate: Tarragon vs the global-restart baseline.

  python -m experiments.latency --config=configs/latency_tiny.py

The paper's Fig. 10-11 at small scale. For each workload ("random", "sharegpt") it builds one
engine per mode, Tarragon (snapshots on) and the MegaScale-like baseline (global restart, no
snapshots), warms both up outside the measured window, then replays a Poisson workload at each
rate in real time, no failures. At each rate both modes replay the same requests back to back
(the order alternating from rate to rate), so the machine's drift cancels in the per-rate ratio
Tarragon / baseline. Writes results.jsonl (one record per workload x mode x rate), summary.json
(the ratios) and latency_<workload>.png (TTFT, TBT p50/p95 and throughput vs rate).
"""

from __future__ import annotations

import os
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX use: AW and EW cells are carved

import numpy as np  # noqa: E402
from absl import app  # noqa: E402

import tarragon_jax as tj  # noqa: E402
from experiments import launch_config  # noqa: E402
from experiments import workload as wl  # noqa: E402
from tarragon_jax.serving.engine import Engine  # noqa: E402
from tarragon_jax.serving.metrics import compile_count  # noqa: E402

_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags("configs/latency_tiny.py")

# mode -> (recovery, snapshots): Tarragon as it serves, and the baseline as MegaScale-Infer runs.
MODES = {"tarragon": ("tarragon", True), "baseline": ("global_restart", False)}
# record field -> name of its ratio in summary.json
METRICS = {"ttft_p50_s": "ttft_p50", "ttft_p95_s": "ttft_p95", "tbt_p50_s": "tbt_p50",
           "tbt_p95_s": "tbt_p95", "throughput_tok_s": "throughput"}


def main(argv):
  del argv
  cd = _CONFIG.value
  launch_config.enable_compile_cache(_CACHE.value)
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  cfg = launch_config.model_config(cd)
  params = tj.init_params(cfg, jax.random.key(cd.seed))
  weights = launch_config.fresh_dir(os.path.join(workdir, "weights"))  # one copy for all engines
  weights_dir = os.path.dirname(tj.save_checkpoint(weights, params, cfg))

  start = time.perf_counter()
  records, warmup = [], {}
  for kind in cd.workloads:
    recs, warmup[kind] = _sweep(cd, cfg, params, weights_dir, kind)
    records += recs
  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  plots = {kind: _plot(os.path.join(workdir, f"latency_{kind}.png"), records, kind, cd)
           for kind in cd.workloads}
  ratios, medians = _report(records, cd)
  launch_config.write_summary(workdir, dict(
      ratios=ratios, ratio_medians=medians, warmup=warmup, plots=plots,
      wall_s=time.perf_counter() - start, runs=len(records),
      devices=str(jax.devices()[0].platform), model=cfg.to_dict()), cd)
  print(f"-> {workdir}")


def _workload(cd, cfg, kind: str, rate: float) -> wl.Workload:
  lengths = (dict(prompt_len=cd.prompt_len, output_len=cd.output_len) if kind == "random" else
             dict(scale=cd.length_scale, sigma=cd.length_sigma))
  return wl.make_workload(kind, cfg, num_requests=max(1, round(rate * cd.arrival_s)), rate=rate,
                          seed=cd.seed, **lengths)


def _engine(cd, cfg, params, weights_dir, mode: str) -> Engine:
  recovery, snapshots = MODES[mode]
  return Engine(cfg, params, launch_config.engine_config(cd, resilience=dict(
      recovery=recovery, snapshots=snapshots, weights_dir=weights_dir)))


def _sweep(cd, cfg, params, weights_dir, kind: str) -> tuple[list[dict], dict]:
  """Both modes on one workload kind at every rate; returns the records and warm-up costs."""
  works = {rate: _workload(cd, cfg, kind, rate) for rate in cd.rates}
  engines, warmup = {}, {}
  try:
    for mode in MODES:
      start, compiles = time.perf_counter(), compile_count()
      engines[mode] = _engine(cd, cfg, params, weights_dir, mode)
      # Every rate's prompts: each prefill bucket any run can use compiles here, not in a run.
      requests = wl.warm_up(engines[mode], [r for work in works.values() for r in work])
      warmup[mode] = dict(seconds=time.perf_counter() - start, requests=requests,
                          compiles=compile_count() - compiles)
      launch_config.progress("%s %s: built and warmed up in %.1f s (%d compilations)", kind, mode,
                             warmup[mode]["seconds"], warmup[mode]["compiles"])
    records = []
    for i, (rate, work) in enumerate(works.items()):
      order = list(MODES) if i % 2 == 0 else list(MODES)[::-1]
      for position, mode in enumerate(order):
        engine, compiles = engines[mode], compile_count()
        result = wl.replay(engine, work, timeout_s=cd.timeout_s)
        record = dict(workload=kind, mode=mode, rate=rate, position=position,
                      recovery=MODES[mode][0], snapshots=MODES[mode][1],
                      compiles_during_run=compile_count() - compiles,
                      mean_prompt_len=float(np.mean([len(r.prompt) for _, r in work])),
                      mean_output_len=float(np.mean([r.max_new_tokens for _, r in work])),
                      **result.summary(engine))
        records.append(record)
        launch_config.progress("%s %s %.1f req/s: %s", kind, mode, rate,
                               {k: round(record[k], 4) for k in METRICS})
  finally:
    for engine in engines.values():
      engine.close()
  return records, warmup


def _by(records: list[dict], kind: str, mode: str) -> list[dict]:
  return sorted((r for r in records if r["workload"] == kind and r["mode"] == mode),
                key=lambda r: r["rate"])


def _report(records: list[dict], cd) -> tuple[dict, dict]:
  """Prints the table; returns per workload the ratios Tarragon / baseline at each rate, and
  their medians over the rates."""
  print(f"\n{'workload':<9}{'rate':>6} {'mode':<10}{'done':>8}{'TTFT p50':>10}{'p95':>9}"
        f"{'TBT p50':>9}{'p95':>8}{'tok/s':>8}{'compiles':>9}")
  ratios = {}
  for kind in cd.workloads:
    tarragon, baseline = _by(records, kind, "tarragon"), _by(records, kind, "baseline")
    ratios[kind] = []
    for t, b in zip(tarragon, baseline, strict=True):
      for r in (t, b):
        print(f"{kind:<9}{r['rate']:>6.1f} {r['mode']:<10}{r['completed']:>4}/{r['requests']:<3}"
              f"{r['ttft_p50_s'] * 1e3:>8.1f}ms{r['ttft_p95_s'] * 1e3:>7.1f}ms"
              f"{r['tbt_p50_s'] * 1e3:>7.1f}ms{r['tbt_p95_s'] * 1e3:>6.1f}ms"
              f"{r['throughput_tok_s']:>8.0f}{r['compiles_during_run']:>9}")
      ratio = {name: t[m] / b[m] for m, name in METRICS.items()}
      ratios[kind].append(dict(rate=t["rate"], **ratio))
      print(f"{'':<16}{'T/B':<18}" + "".join(f"{v:>{w}.3f}" for v, w in zip(
          ratio.values(), (10, 9, 9, 8, 8), strict=True)))
  print("(T/B: Tarragon / baseline at the same rate and requests; < 1 means Tarragon is faster "
        "for latencies, > 1 for tok/s)")
  medians = {kind: {m: float(np.median([r[m] for r in rows])) for m in METRICS.values()}
             for kind, rows in ratios.items()}
  for kind, med in medians.items():
    print(f"{kind}: median over rates of T/B: " + ", ".join(f"{m} {v:.3f}" for m, v in med.items()))
  return ratios, medians


def _plot(path: str, records: list[dict], kind: str, cd) -> str:
  """TTFT and TBT (p50 solid, p95 dashed) and throughput vs rate, both modes, on one figure."""
  import matplotlib

  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  panels = ((axes[0], "ttft", "TTFT (ms, log scale)"), (axes[1], "tbt", "TBT (ms)"))
  for mode, color in zip(MODES, ("C0", "C1")):
    rows = _by(records, kind, mode)
    rates = [r["rate"] for r in rows]
    for ax, metric, _ in panels:
      for q, style in (("p50", "-"), ("p95", "--")):
        ax.plot(rates, [r[f"{metric}_{q}_s"] * 1e3 for r in rows], style, color=color,
                marker="o", label=f"{mode} {q}")
    axes[2].plot(rates, [r["throughput_tok_s"] for r in rows], "-", color=color, marker="o",
                 label=mode)
  axes[0].set_yscale("log")  # queueing past the knee takes TTFT from ms to seconds
  for ax, _, ylabel in panels + ((axes[2], "", "output throughput (tokens/s)"),):
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"{kind} workload, no failures: Tarragon vs global-restart baseline "
               f"({cd.num_aw} AW + {cd.num_ew} EW, {cd.arrival_s:g} s of arrivals per rate)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


if __name__ == "__main__":
  app.run(main)
