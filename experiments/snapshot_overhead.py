"""Fault-free throughput with KV snapshots off, incremental, and pause-and-snapshot.

  python -m experiments.snapshot_overhead --config=configs/snapshot_overhead_tiny.py

Three engines of the same shape (local runtime, one cell per device) serve the same closed-loop
batch (every request submitted at once, greedy), in `reps` interleaved repetitions whose order
alternates:

- `off`: `ResilienceConfig(snapshots=False)`; nothing is snapshotted.
- `incremental`: `ResilienceConfig(snapshots=True)`, the library's scheme: after every step
  each AW hands the snapshot store that step's new KV; the store's thread copies it off the
  decode path.
- `pause`: snapshots off in the engine; this file drives `Engine.step` itself and every
  `pause_every` iterations stops serving to copy every AW's whole cache into a `SnapshotStore`
  and waits until the store has applied it (`PauseAndSnapshot`). This is the naive scheme the
  paper compares against, the foil, not a library feature.

Reports each variant's median output tokens/s, the median of the per-repetition ratios to
`off` (the variants ran back to back, so drift between repetitions cancels), the bytes each
variant snapshotted (`SnapshotStore.bytes_in`) and whether all three generated the same
tokens. Writes results.jsonl, summary.json and snapshot_overhead.png.
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
from tarragon_jax.resilience.snapshot_store import SnapshotStore  # noqa: E402
from tarragon_jax.serving.engine import Engine  # noqa: E402
from tarragon_jax.worker.requests import Request  # noqa: E402

_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags("configs/snapshot_overhead_tiny.py")
VARIANTS = ("off", "incremental", "pause")
_POLL_S = 1e-4  # how often a waiter checks whether the store has caught up


class PauseAndSnapshot:
  """The naive snapshot scheme: serving pauses every `every` iterations while every AW's whole
  cache is copied to `store` synchronously.

  A pause copies each AW's cache (`AttentionWorker.cache_copy`: k, v [L, B, S, K, H]), hands it
  to the store as a base snapshot of that AW's live requests (`SnapshotStore.base`: each row's
  first `cached` positions) and blocks until the store's thread has copied all of it to host
  memory (`caught_up(mark())`); only then does the next step run. One iteration feeds every
  request one token, so every `every` iterations is every `every` tokens.
  """

  def __init__(self, engine: Engine, store: SnapshotStore, every: int):
    if engine.state.store is not None:
      raise ValueError("PauseAndSnapshot: build the engine with ResilienceConfig(snapshots=False)"
                       "; this scheme replaces the engine's own snapshots")
    self.engine, self.store, self.every = engine, store, every
    self.snapshots = 0  # pauses so far
    self.paused_s = 0.0  # time spent in pauses so far

  def generate(self, prompts, max_new_tokens: int) -> list[list[int]]:
    """`Engine.generate` (greedy) with a pause-and-snapshot every `every` iterations."""
    e = self.engine
    ids = [e.submit(Request(tuple(int(t) for t in p), max_new_tokens)) for p in prompts]
    forgotten: set[int] = set()
    iterations = 0
    while not e.idle:
      if not e.step():
        time.sleep(1e-3)  # nothing placed yet (`Engine.run` does the same)
        continue
      iterations += 1
      if iterations % self.every == 0:
        self.snapshot()
        done = {r for r in ids if e.requests[r].done} - forgotten
        for r in sorted(done):  # as the engine does when a request finishes
          self.store.forget(r)
        forgotten |= done
    for r in sorted(set(ids) - forgotten):
      self.store.forget(r)
    return [e.tokens(r) for r in ids]

  def snapshot(self):
    """One pause: every AW's whole cache to the store; returns when the store has applied it."""
    e, t0 = self.engine, time.perf_counter()
    for a in e.state.live_aws():
      # As `Recovery.step_boundary` sends base snapshots to a new store.
      rows = [(r, e.requests[r].slot, e.requests[r].cached) for r in e.state.requests_on(a)
              if e.requests[r].cached > 0]
      if not rows:
        continue
      copy = e.state.aws[a].cache_copy()
      if copy is None:
        raise RuntimeError(f"aw{a} did not answer cache_copy (fault-free run expected)")
      self.store.base(a, rows, copy[0], copy[1])
    _drain(self.store)
    self.snapshots += 1
    self.paused_s += time.perf_counter() - t0


def _drain(store: SnapshotStore) -> float:
  """Blocks until `store` has applied everything queued so far; returns the seconds waited."""
  t0 = time.perf_counter()
  mark = store.mark()
  while not store.caught_up(mark):
    time.sleep(_POLL_S)
  return time.perf_counter() - t0


def _engine(cd, cfg, params, weights_dir: str, snapshots: bool) -> Engine:
  engine = Engine(cfg, params, launch_config.engine_config(cd, resilience=dict(
      snapshots=snapshots, weights_dir=weights_dir)))
  engine.warm_up([1, engine.bucket(cd.prompt_len)])  # decode and the prompts' bucket
  return engine


def _measure(cd, cfg, params, weights_dir: str) -> list[dict]:
  """Builds the three variants and runs the interleaved repetitions; one record per run."""
  engines = {"off": _engine(cd, cfg, params, weights_dir, False),
             "incremental": _engine(cd, cfg, params, weights_dir, True),
             "pause": _engine(cd, cfg, params, weights_dir, False)}
  # Its durable tier goes where the engine's own store would (the engine's scratch directory).
  pause_store = SnapshotStore(cfg, engines["pause"].store_dir, cd.flush_interval_s)
  pauser = PauseAndSnapshot(engines["pause"], pause_store, cd.pause_every)
  stores = {"off": None, "incremental": engines["incremental"].state.store, "pause": pause_store}
  rng = np.random.default_rng(cd.seed + 1)

  def generate(name, prompts, n):
    if name == "pause":
      return pauser.generate(prompts, n)
    return engines[name].generate(prompts, n)

  # Unmeasured: first use of every path (the pause variant's cache copy compiles here).
  warm = rng.integers(0, cfg.vocab_size, (cd.requests, cd.prompt_len)).tolist()
  for name in VARIANTS:
    generate(name, warm, cd.pause_every + 1)
    if stores[name] is not None:
      _drain(stores[name])
  records = []
  try:
    for rep in range(cd.reps):
      prompts = rng.integers(0, cfg.vocab_size, (cd.requests, cd.prompt_len)).tolist()
      outputs = {}
      for name in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
        store = stores[name]
        bytes0 = store.bytes_in if store else 0
        snapshots0, paused0 = pauser.snapshots, pauser.paused_s
        start = time.perf_counter()
        outputs[name] = generate(name, prompts, cd.output_len)
        # Timed: the store applies steps in batches, and the run's last batch is its cost.
        drain_s = _drain(store) if store else 0.0
        seconds = time.perf_counter() - start
        engines[name].release()  # every request it served so far (not timed)
        tokens = sum(map(len, outputs[name]))
        records.append(dict(
            run="throughput", variant=name, rep=rep, seconds=seconds, output_tokens=tokens,
            throughput_tok_s=tokens / seconds,
            snapshot_bytes=(store.bytes_in - bytes0) if store else 0,
            snapshots=pauser.snapshots - snapshots0, paused_s=pauser.paused_s - paused0,
            store_drain_s=drain_s))
        launch_config.progress("%s rep %d: %.0f tok/s", name, rep, records[-1]["throughput_tok_s"])
      for r in records[-len(VARIANTS):]:
        r["tokens_equal_off"] = outputs[r["variant"]] == outputs["off"]
  finally:
    pause_store.stop()
    for engine in engines.values():
      engine.close()
  return records


def main(argv):
  del argv
  cd = _CONFIG.value
  t0 = time.perf_counter()
  launch_config.enable_compile_cache(_CACHE.value)
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  cfg = launch_config.model_config(cd)
  params = tj.init_params(cfg, jax.random.key(cd.seed))
  weights_dir = os.path.dirname(save_checkpoint(os.path.join(workdir, "weights"), params, cfg))
  records = _measure(cd, cfg, params, weights_dir)
  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  summary = _report(records, cd)
  summary["plot"] = _plot(os.path.join(workdir, "snapshot_overhead.png"), records, cd)
  summary["wall_s"] = time.perf_counter() - t0
  launch_config.write_summary(workdir, summary, cd)
  print(f"-> {workdir} ({summary['wall_s']:.0f} s)")


def _by_variant(records: list[dict], field: str) -> dict[str, list]:
  out = {name: [] for name in VARIANTS}
  for r in sorted(records, key=lambda r: r["rep"]):
    out[r["variant"]].append(r[field])
  return out


def _report(records: list[dict], cd) -> dict:
  tp = _by_variant(records, "throughput_tok_s")
  med = {k: float(np.median(v)) for k, v in tp.items()}
  # Ratios within each repetition (the variants ran back to back), then their median.
  ratio = {k: float(np.median(np.divide(tp[k], tp["off"]))) for k in VARIANTS}
  median = {field: {k: float(np.median(v)) for k, v in _by_variant(records, field).items()}
            for field in ("snapshot_bytes", "snapshots", "paused_s", "store_drain_s")}
  tokens_equal = all(r["tokens_equal_off"] for r in records)
  print(f"\n{cd.requests} requests x {cd.output_len} tokens, {cd.num_aw} AW + {cd.num_ew} EW, "
        f"{cd.reps} interleaved reps (medians)")
  print(f"{'variant':<13}{'tok/s':>8}{'/ off':>8}{'snapshot MB':>13}{'pauses':>8}"
        f"{'paused s':>10}{'drain ms':>10}  tok/s per rep")
  for k in VARIANTS:
    print(f"{k:<13}{med[k]:>8.0f}{ratio[k]:>8.3f}{median['snapshot_bytes'][k] / 1e6:>13.2f}"
          f"{median['snapshots'][k]:>8.0f}{median['paused_s'][k]:>10.3f}"
          f"{median['store_drain_s'][k] * 1e3:>10.1f}  " + " ".join(f"{x:.0f}" for x in tp[k]))
  print(f"incremental / off {ratio['incremental']:.3f} (paper: 1147/1148 = 0.999); "
        f"pause every {cd.pause_every} tokens is {1 / ratio['pause']:.2f}x slower than off "
        f"(paper: 2.15x); all variants generated the same tokens: {tokens_equal}")
  return dict(throughput_median_tok_s=med, throughput_incremental_off=ratio["incremental"],
              throughput_pause_off=ratio["pause"], pause_slowdown=1 / ratio["pause"],
              snapshot_bytes_per_rep=median["snapshot_bytes"],
              pauses_per_rep=median["snapshots"]["pause"],
              paused_s_per_rep=median["paused_s"]["pause"],
              store_drain_s=median["store_drain_s"], tokens_equal=tokens_equal,
              output_tokens_per_rep=records[0]["output_tokens"])


def _plot(path: str, records: list[dict], cd) -> str:
  """Bars: median tokens/s per variant; dots: each repetition."""
  import matplotlib

  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt

  tp = _by_variant(records, "throughput_tok_s")
  fig, ax = plt.subplots(figsize=(6, 4))
  xs = np.arange(len(VARIANTS))
  ax.bar(xs, [np.median(tp[k]) for k in VARIANTS], color="0.8", label="median")
  for x, k in zip(xs, VARIANTS):
    ax.plot(np.full(len(tp[k]), x), tp[k], "k.", label="repetition" if x == 0 else None)
  ax.set_xticks(xs, ["off", "incremental", f"pause every {cd.pause_every} tokens"])
  ax.set_xlabel("KV snapshot scheme")
  ax.set_ylabel("output tokens/s")
  ax.set_title(f"fault-free throughput, {cd.requests} requests x {cd.output_len} tokens")
  ax.grid(alpha=0.3, axis="y")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


if __name__ == "__main__":
  app.run(main)
