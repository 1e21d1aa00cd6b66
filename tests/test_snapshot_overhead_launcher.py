"""Smoke test of experiments/snapshot_overhead.py: snapshots off, incremental, pause."""

import json

from test_serve_launcher import SMALL_CLUSTER, _run

from experiments import launch_config


def test_snapshot_overhead_compares_three_schemes_on_the_same_tokens(tmp_path):
  out = _run("experiments.snapshot_overhead", "--config=configs/snapshot_overhead_tiny.py",
             f"--workdir={tmp_path}", *SMALL_CLUSTER, "--config.reps=2", "--config.requests=3",
             "--config.output_len=10", "--config.pause_every=4")
  records = launch_config.read_jsonl(tmp_path / "results.jsonl")
  assert sorted((r["variant"], r["rep"]) for r in records) == [
      ("incremental", 0), ("incremental", 1), ("off", 0), ("off", 1), ("pause", 0), ("pause", 1)]
  assert [r["variant"] for r in records] == ["off", "incremental", "pause",
                                             "pause", "incremental", "off"]  # interleaved
  for r in records:
    assert r["output_tokens"] == 30 and r["throughput_tok_s"] > 0, r
    assert r["tokens_equal_off"] is True, r
  for r in records:
    if r["variant"] == "off":
      assert r["snapshot_bytes"] == 0 and r["snapshots"] == 0, r
    else:
      assert r["snapshot_bytes"] > 0, r
    if r["variant"] == "pause":  # 10 iterations (one prefill, nine decodes), a pause every 4
      assert r["snapshots"] == 2 and r["paused_s"] > 0, r
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["tokens_equal"] is True, out
  assert set(summary["throughput_median_tok_s"]) == {"off", "incremental", "pause"}
  for key in ("throughput_incremental_off", "throughput_pause_off", "pause_slowdown"):
    assert summary[key] > 0, key
  assert summary["snapshot_bytes_per_rep"]["pause"] > 0
  assert summary["snapshot_bytes_per_rep"]["off"] == 0
  assert summary["pauses_per_rep"] == 2 and summary["config"]["pause_every"] == 4
  assert "pause every 4 tokens is" in out
  assert (tmp_path / "snapshot_overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
