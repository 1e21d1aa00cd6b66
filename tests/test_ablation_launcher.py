"""Smoke test of experiments/ablation.py: every variant once, a few short requests."""

import json

from test_serve_launcher import _run

from experiments import launch_config

VARIANTS = {"all_on", "no_snapshots", "no_shadows", "no_probing", "no_durable_tier",
            "no_replacements", "all_off", "global_restart"}


def test_ablation_measures_every_variant_with_the_same_greedy_tokens(tmp_path):
  out = _run("experiments.ablation", "--config=configs/ablation_tiny.py", f"--workdir={tmp_path}",
             "--config.reps=1", "--config.requests=4", "--config.output_len=8")
  records = launch_config.read_jsonl(tmp_path / "results.jsonl")
  assert {r["variant"] for r in records} == VARIANTS and len(records) == len(VARIANTS)
  for r in records:
    assert r["output_tokens"] == 4 * 8, r
    assert r["tokens_match_all_on"] is True, (r, out)
    assert r["throughput_tok_s"] > 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["all_tokens_identical"] is True
  assert set(summary["throughput_median_tok_s"]) == VARIANTS
  assert summary["ratio_to_all_on"]["all_on"] == summary["ratio_to_baseline"]["global_restart"] == 1
  info = summary["variants"]
  # What each variant switched off shows in what it held and logged.
  assert info["all_on"]["shadow_bytes_per_ew"] > 0
  assert info["no_shadows"]["shadow_bytes_per_ew"] == 0
  assert info["all_on"]["snapshot_bytes_in"] > 0 and info["no_snapshots"]["snapshot_bytes_in"] == 0
  assert info["no_probing"]["settings"]["probe_interval_s"] == 1e4
  assert info["global_restart"]["settings"]["recovery"] == "global_restart"
  assert "tokens == all-on" in out
  assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
