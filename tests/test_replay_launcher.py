"""Smoke test of experiments/replay.py (restore vs sequential / parallel replay) with tiny flags.

The launcher runs in a subprocess from the repo root, as its config docstring says, sharing the
tests' persistent compilation cache. Not a timed test: nothing is asserted about speed ratios.
"""

import json

from test_serve_launcher import _run

from experiments import launch_config

METHODS = {"restore", "sequential_replay", "parallel_replay"}


def test_replay_restores_and_replays_to_the_same_cache(tmp_path):
  out = _run("experiments.replay", "--config=configs/replay_tiny.py", f"--workdir={tmp_path}",
             "--config.token_indices=1,8", "--config.reps=1", "--config.continue_tokens=4")
  records = launch_config.read_jsonl(tmp_path / "results.jsonl")
  assert sorted((r["method"], r["token_index"]) for r in records) == sorted(
      (m, i) for m in METHODS for i in (1, 8))
  for r in records:
    name = (r["method"], r["token_index"])
    # The three methods' caches agree: KV within atol, the next and 4 continued greedy tokens.
    assert r["kv_match"] and r["next_token_match"] and r["continuation_match"], name
    assert r["positions"] == 10 + r["token_index"] and r["reps"] == 1 and r["median_ms"] > 0
    kv = 2 * 2 * r["positions"] * 2 * 16 * 4  # k and v, 2 layers, 2 kv heads x 16, float32
    if r["method"] == "restore":
      assert (r["tokens_recomputed"], r["bytes_moved"], r["aw_ew_bytes"]) == (0, kv, 0), name
      assert r["kv_max_abs_diff"] == 0.0  # the store's bytes, unchanged
    else:
      assert r["tokens_recomputed"] == r["positions"], name
      assert r["bytes_moved"] == 4 * r["positions"], name  # int32 token ids
      assert r["aw_ew_bytes"] == 4 * kv, name  # top_k * D = 128 vs K * H = 32 per layer
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["caches_agree"] is True
  assert summary["compiles_during_timing"] == 0
  assert set(summary["speedup_vs_sequential"]) == set(summary["speedup_vs_parallel"]) == {"1", "8"}
  assert (tmp_path / "replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "caches agree: True" in out
