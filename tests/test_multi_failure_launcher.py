"""Smoke test of experiments/multi_failure.py: every scenario with both policies, tiny flags."""

import json

from test_serve_launcher import _run

from experiments import launch_config

SCENARIOS = {"two_ews", "aw_and_ew", "sequence", "during_recovery", "store_and_aw",
             "hang_and_kill"}


def test_multi_failure_recovers_every_scenario_with_fault_free_tokens(tmp_path):
  # Requests run ~0.6 s: the first faults (0.2 s) and the second of a sequence (0.3 s) find them
  # in flight.
  out = _run("experiments.multi_failure", "--config=configs/multi_failure_tiny.py",
             f"--workdir={tmp_path}", "--config.workload.num_requests=8",
             "--config.workload.rate=40", "--config.workload.output_len=64",
             "--config.fault_at_s=0.2", "--config.gap_s=0.1", "--config.warm_all_buckets=False")
  records = launch_config.read_jsonl(tmp_path / "results.jsonl")
  runs = {r["run"]: r for r in records}
  assert set(runs) == {"fault_free"} | {f"{s}_{p}" for s in SCENARIOS
                                         for p in ("tarragon", "global_restart")}
  for name, r in runs.items():
    assert r["error"] is None, (name, r["error"])
    assert r["completed"] == r["requests"] == 8, name
    assert r["output_tokens"] == 8 * 64, name
    if name != "fault_free":
      assert r["tokens_match_fault_free"] is True, (name, out)
      assert "service_stall_s" in r and "max_request_stall_s" in r, name
  for s in SCENARIOS:  # Tarragon: the faults fire; with 2 spares every failed worker is replaced
    r = runs[f"{s}_tarragon"]
    assert len(r["fired"]) + len(r["not_fired"]) == 2, s
    # `when=recovery` fires only if a layer boundary falls inside the recovery, which a hot spare
    # can finish within one step; every other fault fires.
    assert len(r["fired"]) == 2 or (s == "during_recovery" and r["not_fired"] == ["kill:ew1"]), s
    workers = {f["worker"] for f in r["fired"]} - {"store"}
    assert r["no_spare"] == [] and {j["worker"] for j in r["replacements_joined"]} == workers, s
  # EW1 and EW2 both held 4 (layer, expert) pairs: the AWs waited for a replacement.
  assert runs["two_ews_tarragon"]["experts_unreachable"] == 4
  # A hang is found by an unanswered probe (in the exchange, or the idle probe if the AW had no
  # request at that moment), never as a closed connection.
  hung = [d for d in runs["hang_and_kill_tarragon"]["declared"] if d["worker"] == "aw0"]
  assert [d["how"] for d in hung] in (["probe unanswered"], ["idle probe unanswered"])
  # The baseline has no store, and its restart has no layer boundary for `when=recovery`.
  assert runs["store_and_aw_global_restart"]["ignored"] == ["store"]
  assert runs["during_recovery_global_restart"]["not_fired"] == ["kill:ew1"]
  assert all(r["restart_phases"] for n, r in runs.items() if n.endswith("global_restart"))
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["every_request_completed"] is True
  assert summary["all_tokens_match_fault_free"] is True
  assert set(summary["stall_ratios"]) == SCENARIOS
  assert summary["spare_devices"] == 2 and summary["unreachable_if_both_fail"]["ew1+ew3"] == 0
  assert "baseline / Tarragon" in out
  assert (tmp_path / "multi_failure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "timeline_two_ews_tarragon.jsonl").exists()
