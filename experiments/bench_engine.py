"""Disaggregated engine vs co-located model: decode throughput and per-layer transfer cost.

  python -m experiments.bench_engine --config=configs/bench_engine.py

In one process on 8 CPU devices, with the same model, batch and tokens:
- decode tokens/s of the Engine (num_aw AW + num_ew EW cells; `Engine.step` per token, which
  includes host scheduling and fetching the sampled tokens) and of the co-located model
  (`tarragon_jax.extend` + argmax on one device, KV cache of num_aw * slots_per_aw rows, tokens
  fetched every step), repetitions interleaved;
- per decode layer, the phases of the datapath timed one by one with block_until_ready
  (attend+pack on every AW, the AW->EW sends of the packed buffers, the experts on every EW, the
  EW->AW sends of results, combine on every AW), against the same layer dispatched
  asynchronously as the engine does it, plus the bytes `Transfers` counts per layer.
Prints a table, writes results.jsonl and summary.json to the workdir. Legend: B rows, P prompt
length.
"""

from __future__ import annotations

import functools
import os
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX use: AW and EW cells are carved

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402

import tarragon_jax as tj  # noqa: E402
from experiments import launch_config  # noqa: E402
from tarragon_jax.serving.engine import Engine  # noqa: E402
from tarragon_jax.worker import datapath  # noqa: E402
from tarragon_jax.worker.requests import Request  # noqa: E402

_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags("configs/bench_engine.py")

PHASES = ("attend", "send_to_ew", "experts", "send_to_aw", "combine")


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def greedy_step(params, cfg, cache, tokens, slots, n_new):
  """Co-located: extend every row, then argmax. Returns (i32[B, 1] next tokens, cache)."""
  logits, cache = tj.extend(params, cfg, cache, tokens, slots, n_new)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None], cache


def colocated_decode(params, cfg, device, prompts: np.ndarray, steps: int):
  """Prefills i32[B, P] prompts (untimed), times `steps` greedy steps.

  Returns:
    (seconds, i32[B, 1 + steps] tokens).
  """
  B, P = prompts.shape
  slots = jax.device_put(jnp.arange(B, dtype=jnp.int32), device)
  cache = jax.device_put(tj.KVCache.create(cfg, B), device)
  tok, cache = greedy_step(params, cfg, cache, jax.device_put(prompts, device), slots,
                           jax.device_put(jnp.full((B,), P, jnp.int32), device))
  one = jax.device_put(jnp.ones((B,), jnp.int32), device)
  out = [np.asarray(tok)]
  start = time.perf_counter()
  for _ in range(steps):
    tok, cache = greedy_step(params, cfg, cache, tok, slots, one)
    out.append(np.asarray(tok))  # the engine streams every token to the host too
  return time.perf_counter() - start, np.concatenate(out, axis=1)


def engine_decode(engine: Engine, prompts: np.ndarray, steps: int):
  """Fills every slot with prompts (one prefill iteration, untimed), times `steps` decode steps."""
  ids = [engine.submit(Request(tuple(int(t) for t in p), steps + 1)) for p in prompts]
  engine.step()
  start = time.perf_counter()
  for _ in range(steps):
    engine.step()
  seconds = time.perf_counter() - start
  if not engine.idle:
    raise RuntimeError("engine did not finish the batch in 1 + decode_steps iterations")
  return seconds, np.asarray([engine.tokens(i) for i in ids])


def layer_pass(engine: Engine, layer: int, sync: bool) -> dict:
  """One decode layer through the workers; per-phase seconds (sync) or the total (async).

  Sync: every phase runs over all workers and is blocked on before the next starts, so each
  phase (the sends included) is timed in isolation. Async: the engine's order and dispatch,
  one block at the end. Also returns the bytes and arrays sent each way.
  """
  B, top_k = engine.engine_cfg.slots_per_aw, engine.cfg.top_k
  step = engine.iteration
  for aw in engine.state.aws:  # a decode batch over every slot; the x of a previous pass is dropped
    aw.begin(step, np.zeros((B, 1), np.int32), np.ones((B,), np.int32), np.zeros((B,), bool))
  jax.block_until_ready([aw.x for aw in engine.state.aws])
  aws, ews, tr = engine.state.aws, engine.state.ews, engine.transfers
  live, capacity = list(range(len(aws))), B * top_k
  num_ew, S = len(ews), engine.state.placement.slots_per_layer
  times, moved = {}, {}
  clock = [time.perf_counter()]

  def mark(name, arrays):
    jax.block_until_ready(arrays)
    now = time.perf_counter()
    times[name], clock[0] = now - clock[0], now

  if not sync:  # Engine.step's layer body, one block at the end
    engine.run_layer(layer, live, capacity)
    jax.block_until_ready([aw.x for aw in aws])
    return dict(total=time.perf_counter() - clock[0])
  # AttentionWorker.attend, ExpertWorker.run_layer and AttentionWorker.combine, taken apart so
  # that the data plane's sends are timed alone.
  packed = [aw._attend(layer, aw.active, num_ew, S) for aw in aws]
  mark("attend", packed)
  b0, c0 = tr.bytes, tr.count
  for a, aw in enumerate(aws):
    aw.plane.send([(f"ew{m}", (step, layer, 0, aw.name), packed[a][0][m]) for m in range(num_ew)])
  moved["to_ew"] = (tr.bytes - b0, tr.count - c0)
  inbox = [tuple(ew.plane.take((step, layer, 0, f"aw{a}")) for a in live) for ew in ews]
  mark("send_to_ew", inbox)
  outs = [datapath.ew_experts(ew.weights, engine.cfg, layer, inbox[m], num_ew=num_ew,
                              slots=engine.ew_slots[m]) for m, ew in enumerate(ews)]
  mark("experts", outs)
  b0, c0 = tr.bytes, tr.count
  for m, ew in enumerate(ews):
    ew.plane.send([(f"aw{a}", (step, layer, 0, ew.name), outs[m][a]) for a in live])
  moved["to_aw"] = (tr.bytes - b0, tr.count - c0)
  results = [[aw.plane.take((step, layer, 0, f"ew{m}")) for m in range(num_ew)] for aw in aws]
  mark("send_to_aw", results)
  for a, aw in enumerate(aws):
    aw._combine(layer, results[a])
  mark("combine", [aw.x for aw in aws])
  return dict(phases=times, moved=moved)


def main(argv):
  del argv
  cd = _CONFIG.value
  launch_config.enable_compile_cache(_CACHE.value)
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  cfg = launch_config.model_config(cd)
  params = tj.init_params(cfg, jax.random.key(cd.seed))
  engine = Engine(cfg, params, launch_config.engine_config(cd))
  device = engine.cells.aw[0].devices[0]  # the co-located model gets one device of the eight
  col_params = jax.device_put(params, device)
  B, steps, L = cd.num_aw * cd.slots_per_aw, cd.decode_steps, cfg.num_layers
  rng = np.random.default_rng(cd.seed)

  records, match = [], True
  for rep in range(-1, cd.reps):  # rep -1 compiles everything and is not recorded
    prompts = rng.integers(0, cfg.vocab_size, (B, cd.prompt_len)).astype(np.int32)
    order = [("engine", engine_decode, (engine, prompts, steps)),
             ("colocated", colocated_decode, (col_params, cfg, device, prompts, steps))]
    tokens = {}
    for impl, fn, args in order if rep % 2 == 0 else order[::-1]:
      seconds, tokens[impl] = fn(*args)
      if rep >= 0:
        records.append(dict(kind="decode", impl=impl, rep=rep, rows=B, steps=steps,
                            seconds=seconds, tok_s=B * steps / seconds))
    match &= bool(np.array_equal(tokens["engine"], tokens["colocated"]))
    for r in range(cd.layer_reps):
      for layer in range(L):
        for sync in (r % 2 == 0, r % 2 != 0):
          out = layer_pass(engine, layer, sync)
          if rep >= 0:
            records.append(dict(kind="layer_sync" if sync else "layer_async", rep=rep,
                                layer=layer, **out))
  engine.close()  # its snapshot store's thread and scratch directory

  def median(kind, key, impl=None):
    return float(np.median([r[key] for r in records
                            if r["kind"] == kind and r.get("impl") == impl]))

  tok_s = {impl: median("decode", "tok_s", impl) for impl in ("engine", "colocated")}
  sync = [r for r in records if r["kind"] == "layer_sync"]
  phase_ms = {p: 1e3 * float(np.median([r["phases"][p] for r in sync])) for p in PHASES}
  sync_ms = sum(phase_ms[p] for p in PHASES)  # of the medians: noise here is heavy-tailed
  async_ms = 1e3 * median("layer_async", "total")
  send_ms = phase_ms["send_to_ew"] + phase_ms["send_to_aw"]
  (to_ew, n_to_ew), (to_aw, n_to_aw) = sync[0]["moved"]["to_ew"], sync[0]["moved"]["to_aw"]
  payload = 2 * B * cfg.top_k * cfg.hidden_size * np.dtype(cfg.dtype).itemsize  # both ways
  step_ms = {impl: 1e3 * B / rate for impl, rate in tok_s.items()}
  summary = dict(
      rows=B, decode_steps=steps, reps=cd.reps, layer_reps=cd.layer_reps,
      engine_tok_s=tok_s["engine"], colocated_tok_s=tok_s["colocated"],
      engine_over_colocated=tok_s["engine"] / tok_s["colocated"],
      engine_step_ms=step_ms["engine"], colocated_step_ms=step_ms["colocated"],
      tokens_equal=match, layer_phase_ms=phase_ms, layer_sync_ms=sync_ms,
      layer_async_ms=async_ms, layer_send_ms=send_ms,
      send_share_of_sync_layer=send_ms / sync_ms, send_over_async_layer=send_ms / async_ms,
      colocated_layer_ms=step_ms["colocated"] / L,
      engine_step_outside_layers_ms=step_ms["engine"] - L * async_ms,
      bytes_per_layer_to_ew=to_ew, bytes_per_layer_to_aw=to_aw, arrays_per_layer=n_to_ew + n_to_aw,
      bytes_per_layer=to_ew + to_aw, payload_bytes_per_layer=payload)
  results = launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  summary["results"] = results
  launch_config.write_summary(workdir, summary, cd)

  s = summary
  print(f"decode, {B} rows x {steps} steps, median of {cd.reps} interleaved reps, "
        f"{cd.num_aw} AW + {cd.num_ew} EW vs co-located on 1 device:")
  print(f"  {'engine':<12}{s['engine_tok_s']:>10.0f} tok/s {s['engine_step_ms']:>8.2f} ms/step")
  print(f"  {'co-located':<12}{s['colocated_tok_s']:>10.0f} tok/s "
        f"{s['colocated_step_ms']:>8.2f} ms/step")
  print(f"  engine / co-located: {s['engine_over_colocated']:.2f}x   greedy tokens equal: {match}")
  print(f"one decode layer, median of {len(sync)} (all {cd.num_aw} AWs, {cd.num_ew} EWs):")
  for p in PHASES:
    print(f"  {p:<22}{phase_ms[p]:>8.3f} ms  {phase_ms[p] / sync_ms:>6.1%} of phase sum")
  print(f"  {'sum of phases':<22}{sync_ms:>8.3f} ms")
  print(f"  {'layer (async)':<22}{async_ms:>8.3f} ms  sends alone = "
        f"{s['send_over_async_layer']:.0%} of it")
  print(f"  {'co-located layer':<22}{s['colocated_layer_ms']:>8.3f} ms  (co-located step / {L})")
  print(f"  engine step outside the layers (begin, sample, host): "
        f"{s['engine_step_outside_layers_ms']:.2f} ms = step - {L} x async layer")
  print(f"  bytes per layer: AW->EW {to_ew} + EW->AW {to_aw} = {to_ew + to_aw} in "
        f"{n_to_ew + n_to_aw} arrays; routed payload {payload} "
        f"({(to_ew + to_aw) / payload:.1f}x)")
  print(f"-> {workdir}")


if __name__ == "__main__":
  app.run(main)
