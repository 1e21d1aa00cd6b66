"""Smoke test of experiments/worker_memory.py (tiny settings): every worker's load both ways,
each in a process of its own, and the bytes of each worker's part."""

import os
import pathlib
import subprocess
import sys

from experiments import launch_config
from tarragon_jax.worker.placement import place

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_worker_memory_measures_each_workers_load_both_ways(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.worker_memory", "--config=configs/worker_memory.py",
       f"--workdir={tmp_path}", "--config.model.num_layers=2", "--config.model.hidden_size=64",
       "--config.model.expert_hidden=128", "--config.model.num_experts=8",
       "--config.model.vocab_size=256", "--config.num_ew=2",
       "--config.reps=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
  records = launch_config.read_jsonl(tmp_path / "results.jsonl")
  assert sorted((r["worker"], r["way"]) for r in records) == [
      (w, way) for w in ("aw", "ew0", "ew1") for way in ("part", "whole")]
  expert_mib = 3 * 64 * 128 * 4 / 2**20  # (gate, up, down) of one expert, f32
  slots = place(2, 8, 2, shadows_per_expert=1).slots_per_layer  # an EW's, per layer
  for r in records:
    assert r["peak_mib"] >= r["bare_mib"] > 0
    if r["worker"] != "aw":  # every slot of every layer (an empty one holds zeros)
      assert r["part_mib"] == 2 * slots * expert_mib
  (aw,) = {r["part_mib"] for r in records if r["worker"] == "aw"}
  assert aw == records[0]["model_mib"] - 2 * 8 * expert_mib
  assert "whole / part" in proc.stdout
