"""The stall cost model: calibrated here, checked against measured failures, extrapolated.

  python -m experiments.cost_model --config=configs/cost_model_tiny.py

1. Calibrates the terms (T_w, t_pre, t_dec, restore, ...) on this machine for the config's
   engine shape (`experiments.stall_model.calibrate`).
2. Measures four failure stalls: an AW and an EW kill, each with Tarragon and with the global
   restart, on a closed batch (`requests` prompts at once, the kill at layer `fault_layer` of
   decode iteration `fault_token_index`), `failure_reps` times each, with every step timed so
   that each measured stall splits into the formula's terms (medians compared). With
   `--failover_summary=PATH` it reads the runs of experiments/failover.py (or of the older
   experiments/resilience.py) from PATH instead, calibrating for that summary's shape; their
   split is coarser (T_w, detection, restores: at most m times the slowest one).
3. Prints predicted vs measured per term and in total with the relative error, and flags a
   total that is off by more than `flag_threshold`, naming the term with the largest gap. The
   measured stall is the service's longest gap between output tokens, so the prediction is the
   formula's T_stall plus one ordinary decode step (t_step = L*t_dec) and, for the baseline,
   the detection (Tarragon's T_stall includes it).
4. Prints the stalls and the recompute predicted for the paper's setting (Table 1) and for a
   DeepSeek-V3-sized model, against the failure token index i.
Writes results.jsonl, summary.json and cost_model.png (stall vs i, log scale) to the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX use: AW and EW cells are carved

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import tarragon_jax as tj  # noqa: E402
from experiments import launch_config  # noqa: E402
from experiments import stall_model as cm  # noqa: E402
from tarragon_jax.checkpoint import save_checkpoint  # noqa: E402
from tarragon_jax.config import ModelConfig  # noqa: E402
from tarragon_jax.resilience.faults import Fault  # noqa: E402
from tarragon_jax.runtime.remote import ProcessRuntime  # noqa: E402
from tarragon_jax.runtime.spawner import LocalSpawner  # noqa: E402
from tarragon_jax.serving.engine import Engine, EngineConfig  # noqa: E402
from tarragon_jax.serving.metrics import fault_stalls  # noqa: E402
from tarragon_jax.worker.buckets import bucket  # noqa: E402
from tarragon_jax.worker.requests import Request  # noqa: E402

_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags("configs/cost_model_tiny.py")
_SUMMARY = flags.DEFINE_string(
    "failover_summary", None, "summary.json of experiments/failover.py (or resilience.py): "
    "compare with its runs instead of running failures here.")
_MARKS = (1, 8, 64, 128, 256, 512)  # token indices printed


def _shape(cd, summary: dict | None) -> dict:
  """The engine shape to calibrate: the config's, or the one the summary's runs had."""
  shape = dict(model=launch_config.model_config(cd), num_aw=cd.num_aw, num_ew=cd.num_ew,
               slots_per_aw=cd.slots_per_aw, shadows_per_expert=cd.shadows_per_expert,
               probe_interval_s=cd.probe_interval_s, flush_interval_s=cd.flush_interval_s,
               runtime=cd.runtime, prompt_len=cd.prompt_len)
  theirs = (summary or {}).get("config", {})
  for key in shape:
    if key in theirs and key not in ("model", "prompt_len"):
      shape[key] = theirs[key]
  if "model" in theirs:
    shape["model"] = ModelConfig.from_dict(theirs["model"])
  if "prompt_len" in theirs.get("workload", {}):
    shape["prompt_len"] = theirs["workload"]["prompt_len"]
  if shape["runtime"] not in ("local", "process"):
    raise ValueError(f"runtime={shape['runtime']!r}: calibration runs on this host; use 'local' "
                     f"or 'process'")
  return shape


def _engine_cfg(shape, recovery: str, snapshots: bool, weights_dir: str) -> EngineConfig:
  return launch_config.engine_config(shape, resilience=dict(
      recovery=recovery, snapshots=snapshots, weights_dir=weights_dir))


def _runtime(spawner):
  return None if spawner is None else ProcessRuntime(spawner, _CACHE.value)


# -- failure runs on a closed batch ---------------------------------------------------------------


def _failure_run(cd, shape, params, weights_dir, spawner, mode: str, kind: str) -> dict:
  """One kill of aw1 / ew1 at (fault_token_index, fault_layer); the stall and its parts."""
  cfg, P, i = shape["model"], shape["prompt_len"], cd.fault_token_index
  engine = Engine(cfg, params, _engine_cfg(shape, mode, mode == "tarragon", weights_dir),
                  runtime=_runtime(spawner))
  engine.warm_up([1, bucket(P, engine.engine_cfg.min_prefill_bucket, cfg.max_seq_len)])
  rng = np.random.default_rng(cd.seed + 1)
  # An untimed batch of the same shape first: the first executions (and the snapshot store's
  # first writes) are slower than the steady state that calibration measures.
  engine.generate(rng.integers(0, cfg.vocab_size, (cd.requests, P)).tolist(), 4)
  worker = f"{kind}{min(1, shape['num_' + kind] - 1)}"
  engine.arm_faults([Fault(worker, "kill", step=i, layer=cd.fault_layer)])
  ids = [engine.submit(Request(tuple(int(t) for t in p), i + cd.extra_tokens))
         for p in rng.integers(0, cfg.vocab_size, (cd.requests, P))]
  steps = []  # (start, end) of every Engine.step
  while not engine.idle:
    start = time.perf_counter()
    engine.step()
    steps.append((start, time.perf_counter()))
  engine.recovery.wait_for_replacements()
  engine.close()
  tl, s = engine.timeline, engine.summary()
  fault_t = tl.of("fault")[0]["t"]
  events = [e for e in engine.events if e.request_id in set(ids)]  # not the untimed batch
  record = dict(run=f"{mode}_{kind}", mode=mode, fault=kind, token_index=i,
                layer=cd.fault_layer, requests=cd.requests, prompt_len=P,
                **fault_stalls(events, tl, {r: engine.requests[r].arrival for r in ids})[0][1])
  record.update({k: s[k] for k in ("restores", "reprefills", "restore_bytes", "restore_s_max",
                                   "recomputed_tokens", "recomputed_token_layers",
                                   "uncommitted_tail_tokens")})

  def after(event: str) -> list[dict]:  # (a loaded machine may declare a slow worker failed
    return [e for e in tl.of(event) if e["t"] >= fault_t]  # before the fault: not ours)

  record["false_detections"] = len(tl.of("declared_failed")) - len(after("declared_failed"))
  record["detection_s"] = [e["detection_s"] for e in after("declared_failed")[:1]]
  record["restart_phases"] = [{k: v for k, v in e.items() if k not in ("t", "event", "requests")}
                              for e in after("global_restart")[:1]]
  failed = after("aw_failed")
  record["failed_requests"] = len(failed[0]["requests"]) if failed else 0
  record["restore_s"] = [r["seconds"] for r in after("restore")]
  record["restore_s_sum"] = sum(record["restore_s"])
  times = sorted(e.time for e in events)
  last = max(t for t in times if t < fault_t)
  new = min(t for t in times if t > fault_t)

  def step_at(t: float) -> int:
    return next(k for k, (a, b) in enumerate(steps) if a <= t <= b)

  split = {}
  if mode == "global_restart":
    begin, end = after("restart_begin")[0]["t"], after("global_restart")[0]["t"]
    k, d = step_at(begin), step_at(new)
    split = dict(detect_failed_layers=begin - last, T_w=record["restart_phases"][0]["total_s"],
                 reprefill=steps[k + 1][1] - end,
                 redecode=max(0.0, steps[d][0] - steps[k + 1][1]), step=new - steps[d][0])
  else:
    k = step_at(fault_t)
    split = dict(detect=max(record["detection_s"], default=0.0), step=record["tbt_before_s"])
    if kind == "aw":
      split["restores"] = record["restore_s_sum"]
    else:  # the failing step's extra time beyond an ordinary step and the detection
      split["replay"] = steps[k][1] - steps[k][0] - split["step"] - split["detect"]
  record["measured_split_s"] = split
  record["gap_s"] = new - last
  return record


def _median_run(reps: list[dict]) -> dict:
  """One run's repetitions as one record: the median of every measured time."""
  def med(values) -> float:
    return float(np.median(values))

  out = dict(reps[0], reps=len(reps))
  for key in ("service_stall_s", "tbt_before_s", "restore_s_sum", "gap_s",
              "max_request_stall_s", "max_request_gap_s"):
    out[key] = med([r[key] for r in reps])
  out["measured_split_s"] = {k: med([r["measured_split_s"][k] for r in reps])
                             for k in reps[0]["measured_split_s"]}
  out["detection_s"] = [med([max(r["detection_s"], default=0.0) for r in reps])]
  out["false_detections"] = sum(r["false_detections"] for r in reps)
  if reps[0]["restart_phases"]:
    out["restart_phases"] = [dict(reps[0]["restart_phases"][0],
                                  total_s=med([r["restart_phases"][0]["total_s"] for r in reps]))]
  return out


def _summary_runs(summary: dict) -> list[dict]:
  """The first run of each (mode, fault) of a resilience / failover summary."""
  out = {}
  for r in summary.get("runs", []):
    key = (r.get("mode"), r.get("fault"))
    if key[0] in ("tarragon", "global_restart") and key[1] in ("aw", "ew") and key not in out:
      if key == ("tarragon", "aw") and r.get("snapshots") is False:
        continue  # the restore path needs the snapshots
      out[key] = dict(r, run=f"{key[0]}_{key[1]}")
  return [out[k] for k in sorted(out)]


# -- predicted vs measured ------------------------------------------------------------------------


def _rows(c: cm.CostTerms, r: dict, cd, from_summary: bool) -> list[tuple[str, float, float]]:
  """(term, predicted s, measured s or nan) for one failure run; the total comes last."""
  nan, L, split = float("nan"), c.num_layers, r.get("measured_split_s", {})
  i = r.get("token_index", cd.failover_token_index)
  layer = r.get("layer", 0)
  detected = max(r["detection_s"]) if r.get("detection_s") else nan
  if r["mode"] == "global_restart":
    phases = r.get("restart_phases") or [{}]
    # The paper's EW formula, T_w + t_dec: the interrupted layer is redone, the AWs' KV
    # survives (no re-prefill, no re-decode).
    ew = r["fault"] == "ew"
    rows = [("detection + failed layer(s)", c.detect_s + (c.t_dec if ew else layer * c.t_dec),
             split.get("detect_failed_layers", nan)),
            ("T_w (re-init)", c.T_w, phases[0].get("total_s", nan)),
            ("L*t_pre (re-prefill)", 0.0 if ew else L * c.t_pre, split.get("reprefill", nan)),
            ("(i-1)*L*t_dec (re-decode)", 0.0 if ew else (i - 1) * L * c.t_dec,
             split.get("redecode", nan)),
            ("t_step (the new token)", c.t_step, split.get("step", nan))]
  elif r["fault"] == "aw":
    m = r.get("failed_requests") or r.get("restores", 0)
    per = (r.get("restore_bytes", 0) / max(1, r.get("restores", 0)) if from_summary
           else c.kv_bytes_per_token * (c.prompt_len + i - 1))
    rows = [("detection", c.detect_s, detected),
            (f"catch-up + {m} restores",
             c.catchup_s + m * float(cm.restore_time(c, per)),
             r.get("restore_s_sum", r.get("restore_s_max", nan) * m)),  # (summary: bound)
            ("tail recompute", c.tail_tokens * c.t_step,
             r.get("uncommitted_tail_tokens", 0) / max(1, m) * c.t_step),
            ("t_step (the new token)", c.t_step, r.get("tbt_before_s", nan))]
  else:
    rows = [("detection", c.detect_s, detected),
            ("t_layer (replay to shadows)", c.t_layer, split.get("replay", nan)),
            ("t_step (the new token)", c.t_step, r.get("tbt_before_s", nan))]
  rows.append(("total (service stall)", sum(p for _, p, _ in rows), r["service_stall_s"]))
  return rows


def _compare(c: cm.CostTerms, r: dict, cd, from_summary: bool) -> dict:
  rows = _rows(c, r, cd, from_summary)
  (_, pred, meas), parts = rows[-1], rows[:-1]
  rel = pred / meas - 1 if meas > 0 else float("nan")
  known = [(abs(p - m), name) for name, p, m in parts if np.isfinite(m)]
  unknown = [name for name, _, m in parts if not np.isfinite(m)]
  responsible = max(known)[1] if known else None
  if unknown and sum(g for g, _ in known) < abs(pred - meas) / 2:  # the measured terms agree
    responsible = "one of the terms not measured: " + ", ".join(unknown)
  out = dict(kind="comparison", run=r["run"], mode=r["mode"], fault=r["fault"],
             rows=[dict(term=n, predicted_s=p, measured_s=m) for n, p, m in rows],
             predicted_s=pred, measured_s=meas, rel_err=rel,
             flagged=bool(not np.isfinite(rel) or abs(rel) > cd.flag_threshold),
             responsible=responsible)
  if r["mode"] == "global_restart" and r["fault"] == "ew":
    # As this library implements it, the restart recomputes every request on an EW failure too.
    i, layer = r.get("token_index", cd.failover_token_index), r.get("layer", 0)
    out["as_implemented_s"] = float(cm.baseline_stall_aw(c, i, layer)) + c.detect_s + c.t_step
  if r["mode"] == "global_restart" and not from_summary:
    out["recomputed_tokens"] = dict(predicted=r["requests"] * (r["prompt_len"] + r["token_index"]
                                                               - 1),
                                    measured=r["restart_phases"][0]["recomputed_tokens"])
  elif r["mode"] == "tarragon" and r["fault"] == "aw" and not from_summary:
    tl = dataclasses.replace(c, g_pre=0.0, g_dec=1.0)  # FLOPs -> token-layers
    out["recomputed_token_layers"] = dict(
        predicted=float(cm.tarragon_recompute(tl, r["layer"], r["failed_requests"])),
        measured=r["recomputed_token_layers"])
  return out


def _print_comparison(cmp: dict, r: dict, threshold: float):
  where = (f"decode iteration i={r['token_index']}, layer {r['layer']}, {r['requests']} "
           f"requests in flight; measured: median of {r.get('reps', 1)} runs" if "token_index" in r
           else "measured: from the summary")
  print(f"\n{cmp['mode']}, {cmp['fault'].upper()} killed ({where}):")
  if r.get("false_detections"):
    print(f"  (note: {r['false_detections']} worker(s) declared failed before the fault: a "
          f"loaded machine starved them past the detection window)")
  print(f"  {'term':<34}{'predicted':>11}{'measured':>11}{'rel. err':>10}")
  total = cmp["measured_s"]
  for row in cmp["rows"]:
    p, m = row["predicted_s"], row["measured_s"]
    # (no relative error for terms under 0.1 ms on both sides: that is timer noise)
    rel = p / m - 1 if np.isfinite(m) and m > 0 and max(p, m) > 1e-4 else float("nan")
    # A term is marked only where it matters: off by > threshold and > 5% of the total stall.
    mark = " !" if np.isfinite(rel) and abs(rel) > threshold and abs(p - m) > 0.05 * total else ""
    ms = f"{m * 1e3:>9.2f}ms" if np.isfinite(m) else f"{'n/a':>11}"
    err = f"{rel:>+9.0%}" if np.isfinite(rel) else f"{'':>9}"
    print(f"  {row['term']:<34}{p * 1e3:>9.2f}ms{ms}{err}{mark}")
  if cmp["flagged"]:
    print(f"  -> FLAG: total off by {cmp['rel_err']:+.0%} (> {threshold:.0%}); largest gap: "
          f"{cmp['responsible']}")
  if "as_implemented_s" in cmp:
    print(f"  (the paper's EW formula assumes the AWs' KV survives; this library's restart "
          f"recomputes every request on an EW failure too: as implemented, predicted "
          f"{cmp['as_implemented_s'] * 1e3:.1f} ms, {cmp['as_implemented_s'] / total - 1:+.0%})")
  for key in ("recomputed_tokens", "recomputed_token_layers"):
    if key in cmp:
      print(f"  {key.replace('_', ' ')}: predicted {cmp[key]['predicted']:.0f}, measured "
            f"{cmp[key]['measured']}")


# -- extrapolation --------------------------------------------------------------------------------


def _settings(cd, here: cm.CostTerms, shape: dict) -> list[tuple[cm.CostTerms, int, int]]:
  """(terms, requests in flight M, requests per failed AW m) for here, the paper, DeepSeek."""
  assume = cm.Assumptions(load_bw=cd.load_bw_gbs * 1e9, restore_s=cd.restore_ms * 1e-3,
                          restore_bw=cd.restore_bw_gbs * 1e9, detect_s=cd.detect_ms * 1e-3)
  paper = cm.paper_terms(assume)
  mixtral = cm.Architecture.from_config(cm.mixtral_8x7b(), "mixtral_8x7b")
  deepseek = cm.extrapolate(cm.deepseek_v3(), ref=paper, ref_arch=mixtral,
                            num_ew=cd.deepseek_num_ew, assume=assume,
                            name=f"DeepSeek-V3-sized, 8 AW + {cd.deepseek_num_ew} EW, H200")
  M = cd.in_flight_per_aw * cm.PAPER_NUM_AW
  here_m = -(-cd.requests // shape["num_aw"])
  return [(here, cd.requests, here_m), (paper, M, cd.in_flight_per_aw),
          (deepseek, M, cd.in_flight_per_aw)]


def _curves(c: cm.CostTerms, M: int, m: int, i: np.ndarray) -> dict:
  return dict(baseline_aw_s=cm.baseline_stall_aw(c, i),
              baseline_ew_s=np.full(i.shape, cm.baseline_stall_ew(c)),
              tarragon_aw_s=cm.tarragon_stall_aw(c, i, m),
              tarragon_ew_s=np.full(i.shape, cm.tarragon_stall_ew(c)),
              baseline_recompute_flops=cm.baseline_recompute(c, i, in_flight=M))


def _plot(path: str, settings, i: np.ndarray) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D

  styles = {"baseline_aw_s": ("-", "global restart, AW failure"),
            "baseline_ew_s": ("-.", "global restart, EW failure (paper)"),
            "tarragon_aw_s": ("--", "Tarragon, AW failure"),
            "tarragon_ew_s": (":", "Tarragon, EW failure")}
  fig, ax = plt.subplots(figsize=(8, 5))
  colors = ["tab:green", "tab:blue", "tab:red"]
  for (c, M, m), color in zip(settings, colors):
    curves = _curves(c, M, m, i)
    for key, (ls, _) in styles.items():
      ax.plot(i, curves[key], ls, color=color)
  ax.axhline(cm.PAPER_BASELINE_STALL_S, color="tab:blue", lw=0.8, alpha=0.5)
  ax.annotate(f"paper, measured: ~{cm.PAPER_BASELINE_STALL_S:.0f} s",
              (i[-1], cm.PAPER_BASELINE_STALL_S), ha="right", va="bottom", fontsize=7,
              color="tab:blue")
  ax.set_yscale("log")
  ax.set_xlabel("failure token index i (decode iteration hit by the failure)")
  ax.set_ylabel("predicted stall (s, log scale)")
  ax.set_title("Failure stall predicted by the cost model")
  ax.grid(alpha=0.3, which="both")
  first = ax.legend([Line2D([], [], color=col) for col in colors[:len(settings)]],
                    [c.name for c, _, _ in settings], loc="upper left", fontsize=7)
  ax.add_artist(first)
  ax.legend([Line2D([], [], ls=ls, color="k") for ls, _ in styles.values()],
            [label for _, label in styles.values()], loc="center right", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _print_extrapolation(settings, i: np.ndarray) -> list[dict]:
  records = []
  for c, M, m in settings:
    curves = _curves(c, M, m, i)
    print(f"\n{c.name}: L={c.num_layers}, T_w={c.T_w:.3g} s, t_pre={c.t_pre * 1e3:.3g} ms, "
          f"t_dec={c.t_dec * 1e3:.3g} ms per layer; {M} requests in flight, {m} per AW")
    print(f"  {'i':>5}{'restart AW':>13}{'restart EW':>13}{'Tarragon AW':>13}"
          f"{'Tarragon EW':>13}{'AW ratio':>10}{'recompute G':>14}")
    for k in (k for k in _MARKS if k <= i[-1]):
      v = {key: float(a[k - 1]) for key, a in curves.items()}
      print(f"  {k:>5}{v['baseline_aw_s']:>12.3f}s{v['baseline_ew_s']:>12.3f}s"
            f"{v['tarragon_aw_s'] * 1e3:>11.2f}ms{v['tarragon_ew_s'] * 1e3:>11.2f}ms"
            f"{v['baseline_aw_s'] / v['tarragon_aw_s']:>9.0f}x"
            f"{v['baseline_recompute_flops'] / 1e12:>10.3g} TF")
    for k in range(len(i)):
      records.append(dict(kind="extrapolation", setting=c.name, i=int(i[k]),
                          **{key: float(a[k]) for key, a in curves.items()}))
  return records


# -- main -----------------------------------------------------------------------------------------


def main(argv):
  del argv
  cd = _CONFIG.value
  launch_config.enable_compile_cache(_CACHE.value)
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  summary_in = None
  if _SUMMARY.value:
    with open(_SUMMARY.value) as f:
      summary_in = json.load(f)
  shape = _shape(cd, summary_in)
  cfg = shape["model"]
  slots = shape["num_aw"] * shape["slots_per_aw"]
  if cd.requests > slots:  # a batch is placed at once (and a summary's shape may be smaller)
    logging.warning("requests=%d > %d request slots: using %d", cd.requests, slots, slots)
    cd.requests = slots
  params = tj.init_params(cfg, jax.random.key(cd.seed))
  weights_dir = os.path.dirname(save_checkpoint(os.path.join(workdir, "weights"), params, cfg))
  spawner = LocalSpawner(cd.slots, cd.platform) if shape["runtime"] == "process" else None
  try:
    launch_config.progress("calibrating (%s runtime)", shape["runtime"])
    here, details = cm.calibrate(
        cfg, params, _engine_cfg(shape, "tarragon", True, weights_dir),
        runtime=_runtime(spawner), num_requests=cd.requests, prompt_len=shape["prompt_len"],
        decode_steps=cd.calibration.decode_steps, reps=cd.calibration.reps,
        layer_reps=cd.calibration.layer_reps, restarts=cd.calibration.restarts, seed=cd.seed,
        name=f"here: {cfg.num_layers}-layer, {cfg.hidden_size}-wide MoE, {shape['num_aw']} AW + "
             f"{shape['num_ew']} EW, {shape['runtime']}")
    all_runs = []
    if summary_in is None:
      for rep in range(cd.failure_reps):  # interleaved: the machine's drift spreads over all
        for mode in ("global_restart", "tarragon"):
          for kind in ("aw", "ew"):
            launch_config.progress("failure run %s %s, repetition %d", mode, kind, rep)
            all_runs.append(dict(_failure_run(cd, shape, params, weights_dir, spawner, mode,
                                              kind), rep=rep))
      runs = [_median_run([r for r in all_runs if r["run"] == name])
              for name in dict.fromkeys(r["run"] for r in all_runs)]
    else:
      runs = _summary_runs(summary_in)
  finally:
    if spawner is not None:
      spawner.close()
  print(f"calibrated ({details['runtime']} runtime, {cd.requests} requests of "
        f"{shape['prompt_len']} tokens): T_w = {here.T_w:.3f} s ("
        + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in details["restart_phases"][0].items()
                    if k != "total_s")
        + f"), t_pre = {here.t_pre * 1e3:.2f} ms, t_dec = {here.t_dec * 1e3:.2f} ms per layer "
        f"(whole steps / L), t_layer = {here.t_layer * 1e3:.2f} ms, restore = "
        f"{here.restore_s * 1e3:.2f} ms + {here.restore_s_per_byte * 1e9:.3g} ns/byte (store "
        f"catch-up {here.catchup_s * 1e3:.2f} ms), detection {here.detect_s * 1e3:.0f} ms; the "
        f"first prefill + decode after a restart took "
        f"{details['cold_prefill_decode_s'] * 1e3:.1f} ms (warm: "
        f"{details['warm_prefill_decode_s'] * 1e3:.1f} ms)")
  comparisons = [_compare(here, r, cd, summary_in is not None) for r in runs]
  for cmp, r in zip(comparisons, runs):
    _print_comparison(cmp, r, cd.flag_threshold)
  ordinary = [r["tbt_before_s"] for r in runs if r.get("tbt_before_s")]
  drift = float(np.median(ordinary)) / here.t_step if ordinary else None
  if drift is not None:  # a shared machine's speed changes between calibration and the runs
    print(f"\n(an ordinary decode step during the failure runs took {drift:.2f}x the calibrated "
          f"t_step: how much this machine's speed drifted between calibration and the runs)")

  settings = _settings(cd, here, shape)
  i = np.arange(1, cd.max_token_index + 1)
  extrapolation = _print_extrapolation(settings, i)
  paper = settings[1][0]
  at64 = float(cm.baseline_stall_aw(paper, 64))
  L = paper.num_layers
  reach = 1 + (cm.PAPER_BASELINE_STALL_S - paper.T_w - L * paper.t_pre) / (L * paper.t_dec)
  print(f"\npaper: the formula gives {at64:.1f} s for an AW failure at i = 64 against the "
        f"paper's measured ~{cm.PAPER_BASELINE_STALL_S:.0f} s ({at64 / 64:.2f}x); it reaches "
        f"{cm.PAPER_BASELINE_STALL_S:.0f} s only at i = {reach:.0f}")
  plot = _plot(os.path.join(workdir, "cost_model.png"), settings, i)

  records = [dict(kind="terms", setting=c.name, in_flight=M, per_aw=m, **c.to_dict())
             for c, M, m in settings]
  records.append(dict(kind="calibration", **details))
  records += [dict(kind="failure_run", **r) for r in all_runs or runs]
  records += comparisons + extrapolation
  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  summary = dict(
      terms={c.name: c.to_dict() for c, _, _ in settings}, calibration=details,
      comparisons=comparisons, flagged=[c["run"] for c in comparisons if c["flagged"]],
      source=_SUMMARY.value or "own failure runs", plot=plot, step_drift=drift,
      paper_baseline_aw_at_64_s=at64, paper_measured_stall_s=cm.PAPER_BASELINE_STALL_S,
      stalls_at={c.name: {str(k): {key: float(a[k - 1]) for key, a in _curves(c, M, m, i).items()}
                          for k in _MARKS if k <= i[-1]} for c, M, m in settings})
  launch_config.write_summary(workdir, summary, cd)
  print(f"-> {workdir}")


if __name__ == "__main__":
  app.run(main)
