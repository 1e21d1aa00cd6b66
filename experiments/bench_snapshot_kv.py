"""What taking a step's KV for the snapshot store costs an attention worker's last call.

  python -m experiments.bench_snapshot_kv --config=configs/bench_snapshot_kv.py

`datapath.aw_finish` (sampling, and with snapshots the step's new KV of every layer) timed on one
CPU device, the sampled tokens fetched after every call as the engine does, for each step length
in `seq_lens`: without snapshots ("off"), with the library's KV extraction ("library": a loop
over positions up to `datapath.LOOP_POSITIONS` of them, else one gather), and always with one
gather ("gather", the obvious formulation, defined here as the comparator); calls interleaved by
repetition. Prints us per call and each variant's extra time over no snapshots; writes
results.jsonl (one record per variant, step length and repetition) and summary.json to the
workdir.
"""

from __future__ import annotations

import functools
import os
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX use: the engine's device layout

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402

import tarragon_jax as tj  # noqa: E402
from experiments import launch_config  # noqa: E402
from tarragon_jax.worker import datapath  # noqa: E402

_CONFIG, _WORKDIR, _ = launch_config.define_flags("configs/bench_snapshot_kv.py", cache=False)
VARIANTS = ("off", "library", "gather")


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def finish_with_gather(p, cfg, x, cache, slots, n_new, *sampling):
  """`datapath.aw_finish(..., snapshot=True)` with the step's KV taken by one gather, as one
  compiled call."""
  segment = datapath.gathered_kv(cache, slots, x.shape[1])  # before the lengths advance
  tokens, cache, _ = datapath.aw_finish(p, cfg, x, cache, slots, n_new, *sampling,
                                        snapshot=False)
  return tokens, cache, segment


def _finish(variant: str, params, cfg, cache, inputs):
  """One last call of a step: (tokens, cache, the step's KV or None)."""
  if variant == "gather":
    return finish_with_gather(params, cfg, inputs[0], cache, *inputs[1:])
  return datapath.aw_finish(params, cfg, inputs[0], cache, *inputs[1:],
                            snapshot=variant == "library")


def main(argv):
  del argv
  cd = _CONFIG.value
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  cfg = launch_config.model_config(cd)
  device = jax.devices()[1]
  params = jax.device_put(tj.init_params(cfg, jax.random.key(cd.seed)), device)
  rng = np.random.default_rng(cd.seed)
  B, S = cd.slots_per_aw, cfg.max_seq_len
  kv_shape = (cfg.num_layers, B, S, cfg.num_kv_heads, cfg.head_dim)

  def cache():  # random KV and lengths; every call of a repetition donates it to the next
    k, v = (rng.normal(size=kv_shape).astype(cfg.dtype) for _ in range(2))
    return jax.device_put(tj.KVCache(k, v, rng.integers(0, S, B).astype(np.int32)), device)

  records, summary = [], {}
  for T in cd.seq_lens:
    x = rng.normal(size=(B, T, cfg.hidden_size)).astype(cfg.dtype)
    inputs = [jax.device_put(a, device) for a in (x, np.arange(B, dtype=np.int32),
                                                  np.ones(B, np.int32))]
    inputs += [np.zeros((B, 2), np.uint32), np.zeros(B, np.int32), np.zeros(B, np.float32),
               np.ones(B, np.float32), np.zeros(B, bool)]
    first = cache()
    kv = {v: np.asarray(_finish(v, params, cfg, jax.tree.map(jnp.copy, first), inputs)[2])
          for v in VARIANTS[1:]}  # also compiles each variant
    same = bool(np.array_equal(kv["library"], kv["gather"]))
    for rep in range(cd.reps):
      for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
        c = cache()
        start = time.perf_counter()
        for _ in range(cd.calls):
          tokens, c, _ = _finish(variant, params, cfg, c, inputs)
          np.asarray(tokens)  # the engine fetches each step's tokens
        records.append(dict(variant=variant, seq_len=T, rep=rep,
                            us_per_call=(time.perf_counter() - start) / cd.calls * 1e6))
    med = {v: float(np.median([r["us_per_call"] for r in records
                               if r["variant"] == v and r["seq_len"] == T])) for v in VARIANTS}
    summary[f"T={T}"] = dict(us_per_call=med, same_kv=same,
                             extra_us={v: med[v] - med["off"] for v in VARIANTS[1:]})
    print(f"T={T}: " + ", ".join(f"{v} {med[v]:.1f} us" for v in VARIANTS)
          + f" per call ({B * T} positions); over off: library "
          f"{med['library'] - med['off']:+.1f} us, gather {med['gather'] - med['off']:+.1f} us; "
          f"library / gather time {med['library'] / med['gather']:.3f}; same KV: {same}",
          flush=True)
  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  launch_config.write_summary(workdir, summary, cd)
  print(f"-> {workdir}")


if __name__ == "__main__":
  app.run(main)
