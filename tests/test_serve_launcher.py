"""Smoke tests of experiments/serve.py and experiments/bench_engine.py with tiny flags.

Each launcher runs in a subprocess from the repo root, as its config docstring says, sharing
the tests' persistent compilation cache. The cluster is 2 AW + 2 EW (fewer cells compile less).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tarragon_jax as tj
from experiments import launch_config
from experiments import workload as wl

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL_CLUSTER = ("--config.num_aw=2", "--config.num_ew=2", "--config.slots_per_aw=4")


def _run(module: str, *flags: str) -> str:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  cache = os.environ.get("TARRAGON_JAX_CACHE", "/tmp/tarragon_jax_compile_cache")
  proc = subprocess.run([sys.executable, "-m", module, f"--compile_cache={cache}", *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
  return proc.stdout


def test_random_workload_is_the_papers_and_seeded():
  cfg = tj.ModelConfig()
  work = wl.make_workload("random", cfg, num_requests=2000, rate=50.0, seed=3)
  assert {(len(r.prompt), r.max_new_tokens) for _, r in work} == {(10, 128)}
  arrivals = np.array([t for t, _ in work])
  assert arrivals[0] == 0 and np.all(np.diff(arrivals) >= 0)
  assert 45 < (len(work) - 1) / arrivals[-1] < 55  # Poisson at 50 req/s
  again = wl.make_workload("random", cfg, num_requests=2000, rate=50.0, seed=3)
  assert again == work and again != wl.make_workload("random", cfg, num_requests=2000,
                                                     rate=50.0, seed=4)
  assert all(t == 0 for t, _ in wl.make_workload("random", cfg, num_requests=4,
                                                 rate=float("inf")))


def test_sharegpt_lengths_have_sharegpt_means_and_fit_a_slot():
  rng = np.random.default_rng(0)
  prompts, outputs = wl.sharegpt_lengths(20_000, 100_000, rng)
  assert abs(prompts.mean() / wl.SHAREGPT_PROMPT_MEAN - 1) < 0.05
  assert abs(outputs.mean() / wl.SHAREGPT_OUTPUT_MEAN - 1) < 0.05
  cfg = tj.ModelConfig()  # max_seq_len 256: clipped, and every request validates
  work = wl.make_workload("sharegpt", cfg, num_requests=500, rate=10.0, scale=0.25)
  lens = np.array([(len(r.prompt), r.max_new_tokens) for _, r in work])
  assert lens[:, 0].max() <= 128 and (lens.sum(1) - 1).max() <= 256 and lens.min() >= 1
  assert len(set(lens[:, 0])) > 20  # a mix, not one length
  with pytest.raises(ValueError, match="valid kinds"):
    wl.make_workload("alpaca", cfg, num_requests=1, rate=1.0)
  with pytest.raises(ValueError, match="max_seq_len=256"):
    wl.make_workload("random", cfg, num_requests=1, rate=1.0, prompt_len=200, output_len=100)


def test_prefill_lengths_cover_every_bucket_between_shortest_and_longest_prompt():
  def work(*prompt_lens):
    return [(0.0, wl.Request(tuple([1] * n), 1)) for n in prompt_lens]

  assert wl.prefill_lengths(work(3, 40, 90), 16, 256) == [16, 32, 64, 128]
  assert wl.prefill_lengths(work(250), 16, 256) == [255]  # bucket 256, room for one decode


def test_serve_runs_a_workload_with_reference_parity_and_no_recompiles(tmp_path):
  out = _run("experiments.serve", "--config=configs/serve_tiny.py", f"--workdir={tmp_path}",
             *SMALL_CLUSTER, "--config.workload.num_requests=6", "--config.workload.rate=40",
             "--config.workload.output_len=6")
  summary = json.loads((tmp_path / "summary.json").read_text())
  for key in ("requests", "completed", "output_tokens", "throughput_tok_s", "ttft_p50_s",
              "ttft_p95_s", "tbt_p50_s", "tbt_p95_s", "recompiles_after_warmup",
              "tokens_match_reference"):
    assert key in summary, (key, out)
  assert summary["requests"] == summary["completed"] == 6
  assert summary["output_tokens"] == 36
  assert summary["tokens_match_reference"] is True
  assert summary["recompiles_after_warmup"] == 0
  assert 0 < summary["ttft_p50_s"] <= summary["ttft_p95_s"]
  assert 0 < summary["tbt_p50_s"] <= summary["tbt_p95_s"]

  records = launch_config.read_jsonl(tmp_path / "tokens.jsonl")
  assert len(records) == 36
  assert {r["request_id"] for r in records} == set(range(6))
  for rid in range(6):
    mine = [r for r in records if r["request_id"] == rid]
    assert [r["index"] for r in mine] == list(range(6))
    times = [r["time"] for r in mine]
    assert times == sorted(times) and times[0] >= 0
    assert all(0 <= r["token"] < 256 for r in mine)
  assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_engine_writes_decode_and_layer_records(tmp_path):
  out = _run("experiments.bench_engine", "--config=configs/bench_engine.py",
             f"--workdir={tmp_path}", *SMALL_CLUSTER, "--config.reps=2",
             "--config.decode_steps=3", "--config.layer_reps=2")
  records = launch_config.read_jsonl(tmp_path / "results.jsonl")
  decode = [r for r in records if r["kind"] == "decode"]
  assert sorted((r["impl"], r["rep"]) for r in decode) == [
      ("colocated", 0), ("colocated", 1), ("engine", 0), ("engine", 1)]
  assert all(r["tok_s"] > 0 and r["rows"] == 8 and r["steps"] == 3 for r in decode)
  sync = [r for r in records if r["kind"] == "layer_sync"]
  assert len(sync) == 2 * 2 * 2 and len([r for r in records if r["kind"] == "layer_async"]) == 8
  # Per layer and AW->EW pair: one f32 buffer [C, D + 2] (tokens, then two columns of slot id),
  # C = 4 rows * top-2.
  assert sync[0]["moved"]["to_ew"] == [2 * 2 * 8 * (64 + 2) * 4, 2 * 2]
  assert sync[0]["moved"]["to_aw"] == [2 * 2 * 8 * 64 * 4, 2 * 2]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["tokens_equal"] is True, out
  assert summary["engine_tok_s"] > 0 and summary["colocated_tok_s"] > 0
  assert "engine / co-located" in out
