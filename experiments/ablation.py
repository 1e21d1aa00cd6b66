"""Ablation: fault-free throughput with each resilience component switched off in turn.

  python -m experiments.ablation --config=configs/ablation_tiny.py

Closed loop (every request at t = 0, greedy), output tokens/s of each variant in `reps`
interleaved repetitions (the order reversed every other repetition), medians reported, and the
median of per-repetition ratios to all-on and to the global-restart baseline (variants of one
repetition run back to back, so the machine's drift cancels). What each variant switches off,
and what that changes in a fault-free run (see `variants`):

- no_snapshots (`snapshots=False`): AWs return no per-step KV, no snapshot store runs (so no
  durable tier either).
- no_shadows (`shadows_per_expert=0`): EWs hold primaries only (half the expert slots here);
  the routing table then has no failover target. The ERT lookup itself stays in the datapath
  (it is how tokens find their EW); it cannot be switched off.
- no_probing (probe interval = `off_interval_s`): no idle probes and no probe of a slow output.
  The detector's wait for each step's tokens (polling `is_ready`) remains: it is the datapath's
  wait, not a separate cost.
- no_durable_tier (flush interval = `off_interval_s`): the store keeps KV in host memory only.
- no_replacements (`replace_failed=False`): acts only after a failure, so in a fault-free run it
  is a control that measures the noise floor (warm-up still compiles on the spare devices).
- all_off: all of the above; global_restart: the MegaScale-like baseline (no snapshots, no
  shadows: it restarts everything on a failure).

Every variant must produce the same greedy tokens as all-on in each repetition. Writes
results.jsonl (one record per variant and repetition), summary.json and ablation.png.
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
from tarragon_jax.checkpoint import save_checkpoint  # noqa: E402
from tarragon_jax.resilience.detector import DetectionConfig  # noqa: E402
from tarragon_jax.serving.engine import Engine, ResilienceConfig  # noqa: E402

_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags("configs/ablation_tiny.py")

REFERENCE, BASELINE = "all_on", "global_restart"


def variants(cd) -> dict[str, tuple[str, dict]]:
  """name -> (what is switched off, the engine settings that differ from all-on)."""
  off = cd.off_interval_s
  return {
      "all_on": ("nothing", {}),
      "no_snapshots": ("incremental KV snapshots (and the store)", dict(snapshots=False)),
      "no_shadows": ("shadow experts (no ERT failover target)", dict(shadows_per_expert=0)),
      "no_probing": ("idle probing / probe of slow outputs", dict(probe_interval_s=off)),
      "no_durable_tier": ("the store's tensorstore tier", dict(flush_interval_s=off)),
      "no_replacements": ("replacement workers (control)", dict(replace_failed=False)),
      "all_off": ("all of the above", dict(snapshots=False, shadows_per_expert=0,
                                           probe_interval_s=off, flush_interval_s=off,
                                           replace_failed=False)),
      "global_restart": ("baseline: global restart", dict(recovery="global_restart",
                                                          snapshots=False, shadows_per_expert=0)),
  }


def _settings(cd, changes: dict) -> dict:
  s = dict(recovery="tarragon", snapshots=True, shadows_per_expert=cd.shadows_per_expert,
           probe_interval_s=cd.probe_interval_s, flush_interval_s=cd.flush_interval_s,
           replace_failed=True)
  return {**s, **changes}


def _engine(cd, cfg, params, weights_dir, s: dict) -> tuple[Engine, float]:
  """An engine with settings `s`, warmed up for decode and the prompts' prefill bucket."""
  probe = s["probe_interval_s"]
  rc = ResilienceConfig(recovery=s["recovery"], snapshots=s["snapshots"],
                        replace_failed=s["replace_failed"], flush_interval_s=s["flush_interval_s"],
                        weights_dir=weights_dir,
                        detection=DetectionConfig(probe_interval_s=probe,
                                                  deadline_s=max(10.0, 2 * probe)))
  engine = Engine(cfg, params, launch_config.engine_config(
      cd, shadows_per_expert=s["shadows_per_expert"], resilience=rc))
  start = time.perf_counter()
  engine.warm_up([1, engine.bucket(cd.prompt_len)])  # the only step lengths a closed loop runs
  return engine, time.perf_counter() - start


def main(argv):
  del argv
  cd = _CONFIG.value
  launch_config.enable_compile_cache(_CACHE.value)
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  table = variants(cd)
  names = [n.strip() for n in cd.variants.split(",") if n.strip()]
  unknown = sorted(set(names) - set(table))
  if unknown:
    raise ValueError(f"variants: unknown {unknown}; use names from {list(table)}")
  names = [n for n in table if n in names or n in (REFERENCE, BASELINE)]
  cfg = launch_config.model_config(cd)
  params = tj.init_params(cfg, jax.random.key(cd.seed))
  weights_dir = os.path.dirname(save_checkpoint(os.path.join(workdir, "weights"), params, cfg))

  engines, info = {}, {}
  for name in names:
    settings = _settings(cd, table[name][1])
    engines[name], warm_s = _engine(cd, cfg, params, weights_dir, settings)
    report = engines[name].state.placement.memory_report(cfg)
    info[name] = dict(switched_off=table[name][0], settings=settings, warm_up_s=warm_s,
                      expert_bytes_per_ew=max(m["primary_bytes"] + m["shadow_bytes"]
                                              for m in report),
                      shadow_bytes_per_ew=max(m["shadow_bytes"] for m in report))
  records = []
  rng = np.random.default_rng(cd.seed + 1)
  for rep in range(cd.reps):
    prompts = rng.integers(0, cfg.vocab_size, (cd.requests, cd.prompt_len)).tolist()
    outputs = {}
    for name in (names if rep % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      outputs[name] = engines[name].generate(prompts, cd.output_len)
      engines[name].settle(durable=False)  # the run's KV is in host memory (timed)
      seconds = time.perf_counter() - start
      engines[name].settle()  # its durable writes land before the next variant runs
      engines[name].release()  # every request it served so far (not timed)
      records.append(dict(run="throughput", variant=name, rep=rep, seconds=seconds,
                          output_tokens=sum(map(len, outputs[name])),
                          throughput_tok_s=sum(map(len, outputs[name])) / seconds))
      launch_config.progress("%s rep %d: %.0f tok/s", name, rep, records[-1]["throughput_tok_s"])
    for r in records[-len(names):]:
      r["tokens_match_all_on"] = outputs[r["variant"]] == outputs[REFERENCE]
  for name, engine in engines.items():
    info[name]["snapshot_bytes_in"] = engine.summary()["snapshot_bytes_in"]
    engine.close()

  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  summary = _report(records, info, cd)
  summary["plot"] = _plot(os.path.join(workdir, "ablation.png"), records, names, cd)
  launch_config.write_summary(workdir, summary, cd)
  print(f"-> {workdir}")


def _report(records: list[dict], info: dict, cd) -> dict:
  tp: dict[str, list[float]] = {}
  for r in records:
    tp.setdefault(r["variant"], []).append(r["throughput_tok_s"])
  # Ratios within each repetition (the variants ran back to back), then their median.
  med = {k: float(np.median(v)) for k, v in tp.items()}
  to_on = {k: float(np.median(np.divide(v, tp[REFERENCE]))) for k, v in tp.items()}
  to_base = {k: float(np.median(np.divide(v, tp[BASELINE]))) for k, v in tp.items()}
  same = {k: all(r["tokens_match_all_on"] for r in records if r["variant"] == k) for k in tp}
  print(f"\nfault-free closed loop: {cd.requests} requests x {cd.output_len} tokens, "
        f"{cd.reps} interleaved repetitions (ratios: median of per-repetition ratios)")
  print(f"{'variant':<17}{'switched off':<42}{'tok/s':>7}{'min':>6}{'max':>6}{'/ all-on':>10}"
        f"{'/ base':>8}{'EW MiB':>8}  tokens == all-on")
  for k, v in tp.items():
    print(f"{k:<17}{info[k]['switched_off']:<42}{med[k]:>7.0f}{min(v):>6.0f}{max(v):>6.0f}"
          f"{to_on[k]:>10.3f}{to_base[k]:>8.3f}{info[k]['expert_bytes_per_ew'] / 2**20:>8.2f}"
          f"  {same[k]}")
  print(f"all-on / baseline: {to_on[REFERENCE] / to_on[BASELINE]:.3f}; every variant's greedy "
        f"tokens equal all-on's: {all(same.values())}")
  return dict(variants=info, throughput_median_tok_s=med, ratio_to_all_on=to_on,
              ratio_to_baseline=to_base, tokens_match_all_on=same,
              all_tokens_identical=all(same.values()))


def _plot(path: str, records: list[dict], names: list[str], cd) -> str:
  """Bars: median tokens/s per variant; dots: each repetition."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 4))
  for i, name in enumerate(names):
    values = [r["throughput_tok_s"] for r in records if r["variant"] == name]
    color = "C1" if name == BASELINE else "C2" if name == REFERENCE else "C0"
    ax.bar(i, np.median(values), color=color, alpha=0.7)
    ax.plot([i] * len(values), values, "k.", markersize=4)
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_ylabel("output tokens/s (closed loop)")
  ax.set_title(f"fault-free throughput, {cd.requests} x {cd.output_len} tokens, bars: median of "
               f"{cd.reps}", fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


if __name__ == "__main__":
  app.run(main)
