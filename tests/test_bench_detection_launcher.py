"""Smoke tests of experiments/bench_detection.py (tiny settings), of the soak's up-front checks,
and of the false-alarm count both report."""

import json
import os
import pathlib
import subprocess
import sys

from experiments import launch_config
from tarragon_jax.resilience.timeline import Timeline

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_bench_detection_declares_each_kill_at_once_and_each_stop_by_its_probes(tmp_path):
  proc = _python("-m", "experiments.bench_detection", "--config=configs/bench_detection.py",
                 f"--workdir={tmp_path}", "--compile_cache=", "--config.peers=1",
                 "--config.burners=1", "--config.detectors=adaptive", "--config.healthy_s=1",
                 "--config.reps=1", "--config.warm_rounds=3")
  assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
  records = launch_config.read_jsonl(tmp_path / "results.jsonl")
  phases = {(r["load"], r["detector"]) for r in records}
  assert phases == {("quiet", "adaptive"), ("loaded", "adaptive")}
  for phase in phases:
    mine = [r for r in records if (r["load"], r["detector"]) == phase]
    assert sorted(r["measure"] for r in mine) == ["healthy", "kill", "stop"]
    how = {r["measure"]: r.get("how") for r in mine}
    # A stopped process still accepts connections: only its probes can find it. A killed one
    # is a certainty once its exit is seen (unless its probes time out first).
    assert how["stop"] == "probe unanswered"
    assert how["kill"] in ("connection closed", "probe unanswered")
    (healthy,) = [r for r in mine if r["measure"] == "healthy"]
    assert healthy["requests"] > 0 and healthy["probes"] > 0 and healthy["false_declarations"] >= 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert set(summary["rows"]) == {"quiet/adaptive", "loaded/adaptive"}
  assert "adaptive_stop_median_loaded_over_quiet" in summary
  assert "false/probes" in proc.stdout and "stop p50/p95 ms" in proc.stdout
  assert all(row["kills_closed"] <= row["kill_n"] == 1 for row in summary["rows"].values())


def test_soak_refuses_a_zero_fault_interval_before_it_starts_anything(tmp_path):
  proc = _python("-m", "experiments.soak", "--config=configs/soak_tiny.py",
                 f"--workdir={tmp_path}", "--config.fault_every_s=0")
  assert proc.returncode != 0
  assert "ValueError: soak: fault_every_s=0" in proc.stderr, proc.stderr[-2000:]
  assert "ZeroDivisionError" not in proc.stderr
  assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing ran


def test_a_declaration_no_fault_explains_is_a_false_alarm():
  tl = Timeline()
  tl.add("fault", worker="ew1", kind="kill")
  tl.add("declared_failed", worker="ew1", how="connection closed")  # the fault's
  tl.add("declared_failed", worker="ew0", how="probe unanswered")  # no fault: false
  tl.add("fault", worker="aw1", kind="hang")
  tl.add("fault_ignored", worker="aw1", why="not running")
  tl.add("declared_failed", worker="aw1", how="idle probe unanswered")  # its fault was ignored
  tl.add("declared_failed", worker="ew1", how="probe unanswered")  # the replacement: false
  assert [(e["worker"], e["how"]) for e in tl.unexplained_declarations()] == [
      ("ew0", "probe unanswered"), ("aw1", "idle probe unanswered"), ("ew1", "probe unanswered")]
