"""Serves a workload in real time on AW/EW cells carved from 8 CPU devices; checks greedy parity.

  python -m experiments.serve --config=configs/serve_tiny.py

Builds the model (random init from the config's seed, or `--checkpoint=DIR` for an orbax
checkpoint written by `tarragon_jax.save_checkpoint`), the Engine, warms it up (compiles
outside the measured window), replays the workload in real time and writes to the workdir:
summary.json (throughput, TTFT/TBT p50/p95, recompiles after warm-up, greedy parity with the
single-device reference, failures and stalls when `faults` is set), timeline.jsonl (failure
and recovery events), tokens.jsonl (request_id = workload index, index, token, time in s
from the start of the run) and throughput.png (output tokens/s over the run).
"""

from __future__ import annotations

import os
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX use: AW and EW cells are carved

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import tarragon_jax as tj  # noqa: E402
from experiments import launch_config  # noqa: E402
from experiments import workload as wl  # noqa: E402
from tarragon_jax.resilience.faults import parse_faults  # noqa: E402
from tarragon_jax.serving.engine import Engine  # noqa: E402
from tarragon_jax.serving.metrics import compile_count, fault_stalls  # noqa: E402
from tarragon_jax.serving.reference import reference_greedy  # noqa: E402

_CONFIG, _WORKDIR, _ = launch_config.define_flags("configs/serve_tiny.py", cache=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Orbax checkpoint directory; its model replaces config.model.")
_CACHE = flags.DEFINE_string(
    "compile_cache", launch_config.DEFAULT_COMPILE_CACHE,
    "Persistent compilation cache directory ('' = off).")
_BIN_S = 0.5  # throughput.png bin width


def main(argv):
  del argv
  cd = _CONFIG.value
  launch_config.enable_compile_cache(_CACHE.value)
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  compiles_at_start = compile_count()

  if _CHECKPOINT.value:
    cfg, params = tj.load_checkpoint(_CHECKPOINT.value)
    launch_config.progress("loaded %s: %s", _CHECKPOINT.value, cfg)
  else:
    cfg = launch_config.model_config(cd)
    params = tj.init_params(cfg, jax.random.key(cd.seed))
  faults = parse_faults(cd.faults)  # a bad schedule fails here, before any work
  ec = launch_config.engine_config(cd, resilience=dict(weights_dir=_weights_dir(cd, cfg, params)))
  spawner = launch_config.make_spawner(cd)
  try:
    engine = Engine(cfg, params, ec,
                    runtime=launch_config.make_runtime(cd, spawner, _CACHE.value))
    _serve(cd, cfg, params, engine, faults, workdir, compiles_at_start)
  finally:
    if spawner is not None:
      spawner.close()


def _weights_dir(cd, cfg, params) -> str | None:
  """Where worker processes read the weights: --checkpoint, else a copy written to
  `cd.weights_dir` (which every host must be able to read), else a scratch copy (None)."""
  if _CHECKPOINT.value:
    return _CHECKPOINT.value
  if not cd.weights_dir:
    return None
  if os.path.exists(cd.weights_dir) and os.listdir(cd.weights_dir):
    raise ValueError(f"weights_dir={cd.weights_dir!r} is not empty; remove it, or pass it as "
                     f"--checkpoint to serve the checkpoint it holds")
  return os.path.dirname(tj.save_checkpoint(cd.weights_dir, params, cfg))


def _serve(cd, cfg, params, engine, faults, workdir, compiles_at_start):
  """Warm-up, the real-time run, the reference check and the result files."""
  w = cd.workload
  lengths = (dict(prompt_len=w.prompt_len, output_len=w.output_len) if w.kind == "random" else
             dict(scale=w.length_scale, sigma=w.length_sigma))
  work = wl.make_workload(w.kind, cfg, num_requests=w.num_requests, rate=w.rate, seed=cd.seed,
                          **lengths)

  start = time.perf_counter()
  warm_requests = wl.warm_up(engine, work)
  warmup_s = time.perf_counter() - start
  warmup_compiles = compile_count() - compiles_at_start
  launch_config.progress("warm-up: %d requests, %d compilations, %.1f s", warm_requests,
                         warmup_compiles, warmup_s)

  engine.arm_faults(faults)
  compiles, moved = compile_count(), engine.transfers.bytes
  result = wl.replay(engine, work, timeout_s=cd.timeout_s)
  recompiles = compile_count() - compiles
  engine.close()
  summary = result.summary(engine)
  resilience_summary = engine.summary()
  summary.update({k: v for k, v in resilience_summary.items() if k not in summary})
  summary["stalls"] = [dict(worker=f["worker"], kind=f["kind"], **s) for f, s in fault_stalls(
      result.events(engine), engine.timeline, result.arrivals(engine))]
  engine.timeline.write_jsonl(os.path.join(workdir, "timeline.jsonl"), result.start)
  outputs = [engine.tokens(r) for r in result.ids]

  match, mismatched = None, None
  if cd.check_reference:
    expected = reference_greedy(params, cfg, [r.prompt for _, r in work],
                                [r.max_new_tokens for _, r in work])
    mismatched = [k for k, want in enumerate(expected) if outputs[k] != want]
    match = not mismatched

  index = {rid: k for k, rid in enumerate(result.ids)}
  events = result.events(engine)
  tokens_path = launch_config.write_jsonl(
      os.path.join(workdir, "tokens.jsonl"),
      ({"request_id": index[e.request_id], "index": e.index, "token": e.token,
        "time": e.time - result.start} for e in events))
  times = np.asarray([e.time - result.start for e in events])
  counts, edges = np.histogram(times, bins=np.arange(0.0, times.max() + 2 * _BIN_S, _BIN_S))
  plot = launch_config.save_line_plot(
      os.path.join(workdir, "throughput.png"),
      {"engine": (list(edges[:-1]), list(counts / _BIN_S))},
      xlabel="time (s)", ylabel="output tokens/s",
      title=f"{w.kind}, {w.rate} req/s, {cd.num_aw} AW + {cd.num_ew} EW")

  summary.update(
      recompiles_after_warmup=recompiles, tokens_match_reference=match,
      reference_mismatches=mismatched, warmup_s=warmup_s, warmup_compiles=warmup_compiles,
      transfer_bytes=engine.transfers.bytes - moved, devices=str(jax.devices()[0].platform),
      mean_prompt_len=float(np.mean([len(r.prompt) for _, r in work])),
      mean_output_len=float(np.mean([len(o) for o in outputs])),
      tokens=tokens_path, plot=plot, checkpoint=_CHECKPOINT.value, model=cfg.to_dict())
  launch_config.write_summary(workdir, summary, cd)
  print(f"{summary['completed']}/{summary['requests']} requests, {summary['output_tokens']} "
        f"tokens in {summary['wall_s']:.1f} s: {summary['throughput_tok_s']:.0f} tok/s; "
        f"TTFT p50 {summary['ttft_p50_s'] * 1e3:.1f} ms p95 {summary['ttft_p95_s'] * 1e3:.1f} ms; "
        f"TBT p50 {summary['tbt_p50_s'] * 1e3:.1f} ms p95 {summary['tbt_p95_s'] * 1e3:.1f} ms; "
        f"recompiles after warm-up {recompiles}; greedy == reference: {match}; -> {workdir}")
  for st in summary["stalls"]:
    print(f"{st['kind']} {st['worker']}: service stall {st['service_stall_s'] * 1e3:.1f} ms, "
          f"max request stall {st['max_request_stall_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
  app.run(main)
