"""Bringing back a failed request's KV cache: restore vs sequential and parallel replay (Fig. 12).

  python -m experiments.replay --config=configs/replay_tiny.py

An attention worker fails after a request has generated i tokens; another worker needs that
request's KV for its n = prompt + i positions in a free slot of its (fresh) cache. Three ways,
each timed from the host state a replacement worker starts from to the cache on the device:

  restore            the committed KV [L, n, K, H] that the snapshot store holds in host memory
                     (`SnapshotStore.restore_point`), padded to a restore bucket as
                     `AttentionWorker.restore` pads it, copied to the device and written into the
                     slot (`datapath.aw_restore`);
  sequential_replay  re-prefill the prompt, then i one-token `extend` calls (the generated tokens);
  parallel_replay    one `extend` over prompt + the i generated tokens, padded to a power-of-two
                     bucket (serving/buckets.py).

One CPU device, one request. Every shape is compiled in an untimed first pass, which also checks
that the three caches agree: each method's KV equals the original generation's within
`kv_atol`, each replay's next token is the original one, and `continue_tokens` greedy steps from
each cache give the original tokens. Then `reps` timed repetitions, the methods interleaved (the
order rotates per repetition), medians reported. Bytes moved: every host->device copy of each
method is counted (KV for restore, token ids for the replays); a replay on disaggregated workers
would also move its tokens' activations between AW and EWs, the paper's comparison, given as
`aw_ew_bytes`. Writes results.jsonl (one record per method x index), summary.json, replay.png.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from absl import app

import tarragon_jax as tj
from experiments import launch_config
from tarragon_jax.mesh.transfer import Transfers
from tarragon_jax.resilience.snapshot_store import SnapshotStore
from tarragon_jax.serving.metrics import compile_count
from tarragon_jax.worker import datapath
from tarragon_jax.worker.buckets import bucket
from tarragon_jax.worker.workers import RESTORE_BUCKET

_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags("configs/replay_tiny.py")

METHODS = ("restore", "sequential_replay", "parallel_replay")
PAPER = ("paper (Mixtral-8x7B, H200): restore up to 1800x faster than sequential replay, ~10x "
         "than parallel replay, moving ~1/8 of the data")


class Request:
  """The failed request as a replacement worker sees it, and its original generation."""

  def __init__(self, params, cfg: tj.ModelConfig, cd, prompt: np.ndarray, longest: int):
    self.params, self.cfg, self.cd, self.prompt = params, cfg, cd, prompt
    self.slot = cd.num_slots - 1
    self.device = jax.devices()[0]
    self.target = jax.sharding.SingleDeviceSharding(self.device)
    cache = self.fresh_cache()
    logits, cache = self.prefill(cache, Transfers())
    first = int(np.argmax(np.asarray(logits[0])))
    rest, cache = self.decode(cache, first, longest + cd.continue_tokens)
    self.generated = np.array([first, *rest], np.int32)  # g_1, g_2, ...: generated[j] = g_{j+1}
    self.k, self.v = cache.read(self.slot)  # [L, P + longest + continue_tokens, K, H]

  def fresh_cache(self) -> tj.KVCache:
    return jax.block_until_ready(tj.KVCache.create(self.cfg, self.cd.num_slots))

  def bucket(self, n: int) -> int:
    return bucket(n, self.cd.min_prefill_bucket, self.cfg.max_seq_len)

  def prefill(self, cache, transfers: Transfers, generated: int = 0):
    """One `extend` over the prompt and the first `generated` tokens, padded to a bucket."""
    real = np.concatenate([self.prompt, self.generated[:generated]]) if generated else self.prompt
    tokens = np.zeros((1, self.bucket(len(real))), np.int32)
    tokens[0, :len(real)] = real
    tokens, slots, n = transfers.send(
        (tokens, np.array([self.slot], np.int32), np.array([len(real)], np.int32)), self.target)
    return tj.extend(self.params, self.cfg, cache, tokens, slots, n)

  def decode(self, cache, token: int, steps: int):
    """Greedy decoding from `token` (already sampled, not yet in the cache): (tokens, cache)."""
    slots, one = jax.device_put((np.array([self.slot], np.int32), np.ones((1,), np.int32)))
    out = []
    for _ in range(steps):
      logits, cache = tj.extend(self.params, self.cfg, cache, np.array([[token]], np.int32),
                                slots, one)
      token = int(np.argmax(np.asarray(logits[0])))
      out.append(token)
    return out, cache


def restore(req: Request, store: SnapshotStore, i: int, cache, transfers: Transfers, phases):
  """The store's committed KV of request `i` into the slot, as `AttentionWorker.restore` does."""
  t0 = time.perf_counter()
  k, v = store.restore_point(i)
  phases["read_s"] = time.perf_counter() - t0
  n = k.shape[1]
  pad = ((0, 0), (0, bucket(n, RESTORE_BUCKET, cache.max_len) - n), (0, 0), (0, 0))
  kp, vp, slot, n_d = transfers.send((np.pad(k, pad), np.pad(v, pad), np.int32(req.slot),
                                      np.int32(n)), req.target)
  return datapath.aw_restore(cache, slot, kp, vp, n_d), None


def sequential_replay(req: Request, i: int, cache, transfers: Transfers):
  """Re-prefill of the prompt, then the i generated tokens one `extend` call each."""
  logits, cache = req.prefill(cache, transfers)
  slots, one = transfers.send((np.array([req.slot], np.int32), np.ones((1,), np.int32)),
                              req.target)
  for token in req.generated[:i]:
    tok = transfers.send(np.array([[token]], np.int32), req.target)
    logits, cache = tj.extend(req.params, req.cfg, cache, tok, slots, one)
  return cache, logits


def parallel_replay(req: Request, i: int, cache, transfers: Transfers):
  """One `extend` over the prompt and the i generated tokens."""
  logits, cache = req.prefill(cache, transfers, generated=i)
  return cache, logits


REPLAYS = {"sequential_replay": sequential_replay, "parallel_replay": parallel_replay}


def run_once(req: Request, store: SnapshotStore, method: str, i: int) -> dict:
  """One timed run of `method` at failure index `i` into a fresh cache, checked afterwards."""
  cache, transfers, phases = req.fresh_cache(), Transfers(), {}
  t0 = time.perf_counter()
  if method == "restore":
    cache, logits = restore(req, store, i, cache, transfers, phases)
  else:
    cache, logits = REPLAYS[method](req, i, cache, transfers)
  jax.block_until_ready((cache, logits))
  seconds = time.perf_counter() - t0
  n = len(req.prompt) + i
  k, v = cache.read(req.slot)
  diff = (max(float(np.abs(k - req.k[:, :n]).max()), float(np.abs(v - req.v[:, :n]).max()))
          if k.shape[1] == n else float("inf"))
  next_token = None if logits is None else int(np.argmax(np.asarray(logits[0])))
  return dict(seconds=seconds, cache=cache, length=k.shape[1], kv_max_abs_diff=diff,
              next_token=next_token, h2d_bytes=transfers.bytes, **phases)


def check(req: Request, store: SnapshotStore, method: str, i: int) -> dict:
  """The untimed first run (compiles its shapes) and the agreement checks."""
  cd, P = req.cd, len(req.prompt)
  run = run_once(req, store, method, i)
  expected = req.generated[i + 1:i + 1 + cd.continue_tokens]
  continued, _ = req.decode(run.pop("cache"), int(req.generated[i]), cd.continue_tokens)
  return dict(kv_match=run["length"] == P + i and run["kv_max_abs_diff"] <= cd.kv_atol,
              next_token_match=run["next_token"] in (None, int(req.generated[i])),
              continuation_match=bool(np.array_equal(continued, expected)),
              warmup_kv_max_abs_diff=run["kv_max_abs_diff"])


def fill_store(store: SnapshotStore, req: Request, indices) -> None:
  """Logs request i's steps as an AW would: its prefill, then one token per decode step."""
  P = len(req.prompt)
  kv = np.stack([req.k, req.v])[:, :, None]  # [2, L, B=1, positions, K, H]
  for i in indices:
    store.log_step(0, 0, [(i, 0, 0, P)], kv[:, :, :, :P])
    for j in range(P, P + i):
      store.log_step(0, j - P + 1, [(i, 0, j, 1)], kv[:, :, :, j:j + 1])
  mark, deadline = store.mark(), time.perf_counter() + 60
  while not store.caught_up(mark):
    if time.perf_counter() > deadline:
      raise RuntimeError("the snapshot store did not apply the logged steps within 60 s")
    time.sleep(0.01)
  for i in indices:
    if store.committed(i) != P + i:
      raise RuntimeError(f"request {i}: store committed {store.committed(i)}, expected {P + i}")


def main(argv):
  del argv
  t_start = time.perf_counter()
  cd = _CONFIG.value
  cfg = launch_config.model_config(cd)
  indices = sorted({int(i) for i in cd.token_indices})
  P, C = cd.prompt_len, cd.continue_tokens
  if not indices or indices[0] < 1 or P < 1 or C < 1 or cd.reps < 1:
    raise app.UsageError("token_indices must be >= 1; prompt_len, continue_tokens, reps >= 1")
  if P + indices[-1] + C > cfg.max_seq_len:
    raise app.UsageError(
        f"prompt_len + max(token_indices) + continue_tokens = {P + indices[-1] + C} exceeds "
        f"max_seq_len={cfg.max_seq_len}: lower the largest index to "
        f"{cfg.max_seq_len - P - C} or raise model.max_seq_len")
  launch_config.enable_compile_cache(_CACHE.value)
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  params = tj.init_params(cfg, jax.random.key(cd.seed))
  prompt = np.random.default_rng(cd.seed).integers(0, cfg.vocab_size, P, dtype=np.int32)
  req = Request(params, cfg, cd, prompt, indices[-1])

  with tempfile.TemporaryDirectory() as store_dir:
    # No durable flushes during the run: the tensorstore writes would share the timed cores.
    store = SnapshotStore(cfg, store_dir, flush_interval_s=3600.0)
    try:
      fill_store(store, req, indices)
      checks = {(m, i): check(req, store, m, i) for i in indices for m in METHODS}
      launch_config.progress("warm-up and checks done; timing %d repetitions", cd.reps)
      compiles, load_before = compile_count(), os.getloadavg()[0]
      runs = {key: [] for key in checks}
      for rep in range(cd.reps):
        order = METHODS[rep % 3:] + METHODS[:rep % 3]
        for i in indices:
          for m in order:
            run = run_once(req, store, m, i)
            del run["cache"]
            runs[m, i].append(run)
      compiles = compile_count() - compiles
    finally:
      store.stop()
  load = (load_before, os.getloadavg()[0])

  records = [_record(cfg, cd, m, i, checks[m, i], runs[m, i]) for i in indices for m in METHODS]
  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  plot = _plot(os.path.join(workdir, "replay.png"), records, indices, cfg)
  summary = _summary(cfg, cd, records, indices, compiles, load, plot)
  summary["elapsed_s"] = time.perf_counter() - t_start
  launch_config.write_summary(workdir, summary, cd)
  _print(cfg, cd, records, indices, summary)
  print(f"-> {workdir} ({summary['elapsed_s']:.0f} s)")


def _record(cfg: tj.ModelConfig, cd, method: str, i: int, chk: dict, runs: list[dict]) -> dict:
  P, item = cd.prompt_len, np.dtype(cfg.dtype).itemsize
  n = P + i
  kv_bytes = 2 * cfg.num_layers * n * cfg.num_kv_heads * cfg.head_dim * item
  replay = method != "restore"
  recomputed = n if replay else 0  # the store is caught up: no uncommitted tail
  padded = {"restore": 0, "parallel_replay": bucket(n, cd.min_prefill_bucket, cfg.max_seq_len),
            "sequential_replay": bucket(P, cd.min_prefill_bucket, cfg.max_seq_len) + i}[method]
  times = [r["seconds"] for r in runs]
  rec = dict(
      method=method, token_index=i, prompt_len=P, positions=n, reps=len(runs),
      median_ms=1e3 * float(np.median(times)), min_ms=1e3 * min(times),
      times_ms=[1e3 * t for t in times],
      tokens_recomputed=recomputed, positions_computed_with_padding=padded,
      uncommitted_tail=0, kv_bytes=kv_bytes,
      bytes_moved=kv_bytes if not replay else n * 4,  # KV, or int32 token ids
      h2d_bytes=int(np.median([r["h2d_bytes"] for r in runs])),  # incl. padding and indices
      aw_ew_bytes=recomputed * cfg.num_layers * 2 * cfg.top_k * cfg.hidden_size * item,
      kv_max_abs_diff=max(chk["warmup_kv_max_abs_diff"], *(r["kv_max_abs_diff"] for r in runs)),
      kv_match=chk["kv_match"] and all(r["kv_max_abs_diff"] <= cd.kv_atol for r in runs),
      next_token_match=chk["next_token_match"], continuation_match=chk["continuation_match"])
  if not replay:
    rec["store_read_median_ms"] = 1e3 * float(np.median([r["read_s"] for r in runs]))
  return rec


def _summary(cfg, cd, records, indices, compiles, load, plot) -> dict:
  by = {(r["method"], r["token_index"]): r for r in records}
  speedup = {m: {i: by[m, i]["median_ms"] / by["restore", i]["median_ms"] for i in indices}
             for m in METHODS[1:]}
  item = np.dtype(cfg.dtype).itemsize
  kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item
  act_tok = cfg.num_layers * 2 * cfg.top_k * cfg.hidden_size * item
  agree = all(r["kv_match"] and r["next_token_match"] and r["continuation_match"]
              for r in records)
  return dict(
      model=cfg.to_dict(), token_indices=indices, prompt_len=cd.prompt_len, reps=cd.reps,
      caches_agree=agree, kv_atol=cd.kv_atol,
      kv_max_abs_diff={m: max(by[m, i]["kv_max_abs_diff"] for i in indices) for m in METHODS},
      speedup_vs_sequential=speedup["sequential_replay"],
      speedup_vs_parallel=speedup["parallel_replay"],
      max_speedup_vs_sequential=max(speedup["sequential_replay"].values()),
      max_speedup_vs_parallel=max(speedup["parallel_replay"].values()),
      kv_bytes_per_token=kv_tok, aw_ew_bytes_per_token=act_tok,
      kv_over_aw_ew_bytes=kv_tok / act_tok, compiles_during_timing=compiles,
      jax_backend=jax.default_backend(), device=str(jax.devices()[0]),
      cpu_count=os.cpu_count(), load_avg_1min_before_after=load, plot=plot)


def _print(cfg, cd, records, indices, summary):
  by = {(r["method"], r["token_index"]): r for r in records}
  print(f"\nKV restore vs replay, {cfg.num_layers} layers, D={cfg.hidden_size}, prompt "
        f"{cd.prompt_len}, medians of {cd.reps} reps on {summary['device']} (ms)")
  print(f"{'i':>4}{'n':>5}{'restore':>9}{'seq rep':>9}{'par rep':>9}{'seq/res':>9}{'par/res':>9}"
        f"{'KV B':>8}{'tok B':>7}{'AW-EW B':>9}{'recomp':>8}")
  for i in indices:
    res, seq, par = (by[m, i] for m in METHODS)
    print(f"{i:>4}{res['positions']:>5}{res['median_ms']:>9.3f}{seq['median_ms']:>9.2f}"
          f"{par['median_ms']:>9.2f}{summary['speedup_vs_sequential'][i]:>8.1f}x"
          f"{summary['speedup_vs_parallel'][i]:>8.1f}x{res['bytes_moved']:>8}"
          f"{seq['bytes_moved']:>7}{seq['aw_ew_bytes']:>9}{seq['tokens_recomputed']:>8}")
  diffs = ", ".join(f"{m} {d:.1e}" for m, d in summary["kv_max_abs_diff"].items())
  print(f"caches agree: {summary['caches_agree']} (max |dKV| {diffs}; atol {cd.kv_atol}; next "
        f"token and {cd.continue_tokens} continued greedy tokens compared)")
  print(f"max speedup: {summary['max_speedup_vs_sequential']:.0f}x vs sequential, "
        f"{summary['max_speedup_vs_parallel']:.1f}x vs parallel replay; KV per token "
        f"{summary['kv_bytes_per_token']} B vs a replay's AW<->EW activations "
        f"{summary['aw_ew_bytes_per_token']} B (x{summary['kv_over_aw_ew_bytes']:.3f})")
  print(PAPER)
  load = summary["load_avg_1min_before_after"]
  if summary["compiles_during_timing"]:
    print(f"warning: {summary['compiles_during_timing']} compiles during timing")
  if max(load) > (os.cpu_count() or 1):
    print(f"warning: 1-min load average {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} "
          "cores: other processes ran, the times are noisy")


def _plot(path, records, indices, cfg) -> str:
  import matplotlib

  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  by = {(r["method"], r["token_index"]): r for r in records}
  labels = {"restore": "restore (KV from the store, padded to a bucket)",
            "sequential_replay": "sequential replay", "parallel_replay": "parallel replay"}
  fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
  for m in METHODS:
    ax_t.plot(indices, [by[m, i]["median_ms"] for i in indices], marker="o", label=labels[m])
    ax_b.plot(indices, [by[m, i]["h2d_bytes"] for i in indices], marker="o", label=labels[m])
  ax_b.plot(indices, [by["parallel_replay", i]["aw_ew_bytes"] for i in indices], ls="--",
            color="gray", label="replay: AW<->EW activations (disaggregated)")
  ax_t.set_ylabel("time to bring the KV back (ms, median)")
  ax_b.set_ylabel("bytes moved to the device (B)")
  for ax in (ax_t, ax_b):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(indices, [str(i) for i in indices])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("failure token index i (tokens generated before the failure)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  ax_t.set_title(f"{cfg.num_layers}-layer MoE, D={cfg.hidden_size}, {jax.default_backend()}")
  ax_b.set_title("data moved")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


if __name__ == "__main__":
  app.run(main)
