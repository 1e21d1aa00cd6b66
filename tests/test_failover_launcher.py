"""Launcher smoke tests: faults from the serve launcher's flag, and the main job (failover)."""

import json

from test_serve_launcher import SMALL_CLUSTER, _run

from experiments import launch_config


def test_serve_injects_faults_from_its_flag_and_keeps_greedy_parity(tmp_path):
  out = _run("experiments.serve", "--config=configs/serve_tiny.py", f"--workdir={tmp_path}",
             *SMALL_CLUSTER, "--config.workload.num_requests=6", "--config.workload.rate=40",
             "--config.workload.output_len=12", "--config.faults=kill:ew1@step=3; "
             "hang:aw0@step=6")
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["completed"] == 6 and summary["output_tokens"] == 72
  assert summary["tokens_match_reference"] is True, out
  assert summary["failures"] == 2
  assert [(s["worker"], s["kind"]) for s in summary["stalls"]] == [("ew1", "kill"),
                                                                    ("aw0", "hang")]
  events = launch_config.read_jsonl(tmp_path / "timeline.jsonl")
  declared = [e for e in events if e["event"] == "declared_failed"]
  assert [e["worker"] for e in declared] == ["ew1", "aw0"]
  assert declared[1]["how"] == "probe unanswered"  # a hang is found by the probe, not a close
  assert "kill ew1: service stall" in out


def test_failover_main_job_compares_recovery_with_the_baseline(tmp_path):
  out = _run("experiments.failover", "--config=configs/failover_tiny.py",
             f"--workdir={tmp_path}", "--config.workload.num_requests=8",
             "--config.workload.rate=40", "--config.workload.output_len=48",
             "--config.fault_at_s=0.2", "--config.reps=2", "--config.rebuild_every=1",
             "--config.throughput_requests=4", "--config.throughput_output_len=8",
             "--config.warm_all_buckets=False")
  summary = json.loads((tmp_path / "summary.json").read_text())
  keys = {"mode", "fault", "requests", "completed", "service_stall_s", "max_request_stall_s",
          "recomputed_tokens", "throughput_tok_s", "tokens_match_fault_free"}
  runs = {(r["mode"], r["fault"]): r for r in summary["runs"]}
  assert set(runs) == {(m, f) for m in ("tarragon", "global_restart")
                       for f in ("none", "aw", "ew", "ew_hang")}
  for (mode, fault), r in runs.items():
    assert keys <= set(r), (mode, fault)
    assert r["completed"] == r["requests"] == 8, (mode, fault)
    assert r["tokens_match_fault_free"] is True, (mode, fault)
    assert (r["service_stall_s"] is None) == (fault == "none"), (mode, fault)
  for kind in ("aw", "ew", "ew_hang"):
    assert runs["global_restart", kind]["restart_phases"][0]["compile_s"] > 0
  # A hang is found by probes: its detection delay is a real one (a kill's is ~0: the
  # connection closes).
  assert min(runs["tarragon", "ew_hang"]["detection_s"]) > 0
  assert set(summary["throughput_median_tok_s"]) == {"snapshots_on", "snapshots_off",
                                                      "global_restart"}
  for key in ("throughput_tarragon_baseline", "throughput_snapshots_off_baseline"):
    lo, hi = summary[f"{key}_ci"]
    assert lo <= summary[key] <= hi, key
  assert "[8/8] global_restart, fault: ew_hang" in out  # progress
  assert "baseline / Tarragon" in out or "no ratio" in out
  records = launch_config.read_jsonl(tmp_path / "results.jsonl")
  throughput = [r for r in records if r["run"] == "throughput"]
  assert sorted((r["rep"], r["variant"]) for r in throughput) == sorted(
      (rep, v) for rep in (0, 1) for v in ("snapshots_on", "snapshots_off", "global_restart"))
  for png in ("timeline.png", "stalls.png"):
    assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "timeline_tarragon_ew.jsonl").exists()
