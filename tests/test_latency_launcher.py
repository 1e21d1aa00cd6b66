"""Smoke test of experiments/latency.py with tiny flags (not a timed test: no speed ratios).

The launcher runs in a subprocess from the repo root, as its config docstring says, sharing the
tests' persistent compilation cache, on 2 AW + 2 EW cells with two rates of a few requests.
"""

import json
import math

from test_serve_launcher import _run

from experiments import launch_config

RATES = (4.0, 8.0)
ARRIVAL_S = 0.5  # round(rate * ARRIVAL_S) requests per rate: 2 and 4
OUTPUT_LEN = 6


def test_latency_sweeps_rates_for_both_modes_and_workloads(tmp_path):
  out = _run("experiments.latency", "--config=configs/latency_tiny.py", f"--workdir={tmp_path}",
             "--config.num_aw=2", "--config.num_ew=2", "--config.slots_per_aw=4",
             f"--config.rates={RATES}", f"--config.arrival_s={ARRIVAL_S}",
             f"--config.output_len={OUTPUT_LEN}", "--config.length_scale=0.05")
  records = launch_config.read_jsonl(tmp_path / "results.jsonl")
  assert sorted((r["workload"], r["mode"], r["rate"]) for r in records) == sorted(
      (k, m, rate) for k in ("random", "sharegpt") for m in ("tarragon", "baseline")
      for rate in RATES), out
  for r in records:
    n = round(r["rate"] * ARRIVAL_S)
    assert r["requests"] == r["completed"] == n, r
    assert r["compiles_during_run"] == 0, r  # warm-up compiled every shape
    assert 0 < r["ttft_p50_s"] <= r["ttft_p95_s"], r
    assert 0 < r["tbt_p50_s"] <= r["tbt_p95_s"], r
    assert r["throughput_tok_s"] > 0 and r["output_tokens"] >= n, r
    if r["workload"] == "random":
      assert r["output_tokens"] == n * OUTPUT_LEN, r
    assert (r["recovery"], r["snapshots"]) == (
        ("tarragon", True) if r["mode"] == "tarragon" else ("global_restart", False))
  for k in ("random", "sharegpt"):  # both modes replayed the same requests at each rate
    pairs = {}
    for r in records:
      if r["workload"] == k:
        pairs.setdefault(r["rate"], []).append((r["requests"], r["output_tokens"]))
    assert all(len(p) == 2 and p[0] == p[1] for p in pairs.values()), pairs

  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["runs"] == 8 and summary["config"]["rates"] == list(RATES)
  for k in ("random", "sharegpt"):
    assert [row["rate"] for row in summary["ratios"][k]] == list(RATES)
    for row in summary["ratios"][k]:
      for m in ("ttft_p50", "ttft_p95", "tbt_p50", "tbt_p95", "throughput"):
        assert math.isfinite(row[m]) and row[m] > 0, (k, row)
    assert set(summary["ratio_medians"][k]) == {"ttft_p50", "ttft_p95", "tbt_p50", "tbt_p95",
                                                 "throughput"}
    assert set(summary["warmup"][k]) == {"tarragon", "baseline"}
    png = tmp_path / f"latency_{k}.png"
    assert summary["plots"][k] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "T/B" in out and "median over rates" in out
