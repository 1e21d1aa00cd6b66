"""Smoke tests of the launchers: each runs as a user would run it, with tiny flags.

The launchers run in subprocesses from the repo root (as their config docstrings say), sharing
the tests' persistent compilation cache so that repeated runs skip most compiles.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import tarragon_jax as tj
from configs import mixtral_8x7b, qwen3_moe, tiny, train_tiny
from experiments import launch_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(module: str, *flags: str) -> str:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.environ.get("TARRAGON_JAX_CACHE",
                                                      "/tmp/tarragon_jax_compile_cache"))
  proc = subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
  return proc.stdout


def test_configs_are_valid_model_configs():
  shapes = {m.__name__: launch_config.model_config(m.get_config())
            for m in (tiny, train_tiny, mixtral_8x7b, qwen3_moe)}
  assert shapes["configs.tiny"] == shapes["configs.train_tiny"] == tj.ModelConfig()
  big = shapes["configs.mixtral_8x7b"]
  assert (big.vocab_size, big.hidden_size, big.num_layers, big.expert_hidden) == (32000, 4096, 32,
                                                                                  14336)
  qwen = shapes["configs.qwen3_moe"]
  assert (qwen.num_experts, qwen.top_k, qwen.qk_norm, qwen.rms_eps) == (128, 8, True, 1e-6)


def test_model_config_reports_invalid_overrides():
  cd = tiny.get_config()
  cd.model.num_kv_heads = 3
  with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
    launch_config.model_config(cd)
  with pytest.raises(ValueError, match="unknown fields"):
    launch_config.model_dict(num_layer=2)


def test_train_writes_metrics_plot_and_a_restorable_checkpoint(tmp_path):
  out = _run("experiments.train", "--config=configs/train_tiny.py", f"--workdir={tmp_path}",
             "--config.steps=30", "--config.batch_size=8", "--config.seq_len=32",
             "--config.warmup_steps=5", "--config.eval_every=10", "--config.eval_batches=1")
  records = launch_config.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [0, 10, 20, 30]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 1.0, out
  assert summary["restored_eval_loss"] == summary["final_eval_loss"]
  assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  cfg, params = tj.load_checkpoint(str(tmp_path / "checkpoint"))
  assert cfg == tj.ModelConfig() and params.embed.shape == (256, 64)


def test_bench_model_matches_hf_greedy_and_reports_ratios(tmp_path):
  out = _run("experiments.bench_model", "--config=configs/tiny.py", f"--workdir={tmp_path}",
             "--config.batch_size=2", "--config.prompt_len=8", "--config.gen_len=8",
             "--config.reps=2")
  rows = launch_config.read_jsonl(tmp_path / "bench.jsonl")
  assert sorted((r["rep"], r["impl"]) for r in rows) == [(0, "hf"), (0, "ours"), (1, "hf"),
                                                         (1, "ours")]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["greedy_rows_equal"] == 2 and summary["greedy_tokens_equal"] == 2 * 9
  assert summary["ratio_decode_tok_s"] > 0 and summary["ratio_prefill_tok_s"] > 0
  assert "decode tok/s" in out


def test_bench_snapshot_kv_times_each_variant_and_checks_the_library_against_a_gather(tmp_path):
  out = _run("experiments.bench_snapshot_kv", "--config=configs/bench_snapshot_kv.py",
             f"--workdir={tmp_path}", "--config.reps=2", "--config.calls=3",
             "--config.seq_lens=(1, 4)")  # 8 and 32 positions: the loop
  rows = launch_config.read_jsonl(tmp_path / "results.jsonl")
  assert sorted({(r["variant"], r["seq_len"]) for r in rows}) == [
      (v, T) for v in ("gather", "library", "off") for T in (1, 4)]
  assert len(rows) == 2 * 3 * 2 and all(r["us_per_call"] > 0 for r in rows)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["T=1"]["same_kv"] and summary["T=4"]["same_kv"], out
  assert "library / gather time" in out
