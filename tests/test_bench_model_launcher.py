"""The model benchmark's roofline mode, run as a user runs it (a subprocess, tiny flags): decode
tokens/s and the fraction of the measured memory bandwidth for both expert kernels at two batch
sizes, with no torch and no checkpoint; its byte model; the GPU hosts' configs."""

import json
import os
import subprocess
import sys

import tarragon_jax as tj
from configs import failover_gpu, mixtral_8x7b, qwen3_moe
from experiments import launch_config, roofline
from tests.test_launchers import ROOT, _run

# configs/bench_model_roofline.py shrunk to the tiny MoE's shape, two short decode runs.
_TINY = ("--config.model.num_layers=2", "--config.model.hidden_size=64",
         "--config.model.expert_hidden=128", "--config.model.vocab_size=256",
         "--config.model.head_dim=16", "--config.model.max_seq_len=64",
         "--config.decode_batches=(1, 4)", "--config.context_len=16", "--config.decode_steps=2",
         "--config.reps=2", "--config.bandwidth_mib=16", "--config.bandwidth_reps=2")


def test_roofline_mode_reports_tokens_per_second_and_bandwidth_fraction(tmp_path):
  out = _run("experiments.bench_model", "--config=configs/bench_model_roofline.py",
             f"--workdir={tmp_path}", *_TINY)
  rows = launch_config.read_jsonl(tmp_path / "bench.jsonl")
  assert sorted((r["kernel"], r["batch"], r["rep"]) for r in rows) == [
      (k, b, rep) for k in ("capacity", "ragged") for b in (1, 4) for rep in (0, 1)]
  for r in rows:
    assert r["tok_s"] > 0 and 0 < r["fraction"] < 1.5, r
    assert r["fraction"] <= r["fraction_all_experts"], r  # all experts >= the active ones
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["bandwidth"] > 0 and summary["param_bytes"] > 0
  by = {(r["kernel"], r["batch"]): r for r in summary["rows"]}
  assert set(by) == {(k, b) for k in ("capacity", "ragged") for b in (1, 4)}
  assert not any("error" in r for r in by.values()), by
  # Batch 1 activates top_k = 2 of the 8 experts; batch 4 the expected 8 * (1 - (3/4)^4).
  assert by["ragged", 1]["active_experts"] == 2.0
  assert abs(by["ragged", 4]["active_experts"] - 8 * (1 - 0.75**4)) < 1e-9
  assert "of measured" in out and "capacity" in out


def test_roofline_mode_names_an_unknown_kernel(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_model", "--config=configs/bench_model_roofline.py",
       f"--workdir={tmp_path}", "--config.kernels=('ragged', 'grouped')", *_TINY],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "kernels ['grouped']; the variants are ['capacity', " in proc.stderr


def test_step_bytes_count_the_weights_a_step_touches_and_the_kv_it_reads():
  cfg = tj.ModelConfig()  # the tiny MoE: f32, 2 layers, D 64, V 256, 8 experts top-2, F 128
  experts = 2 * 8 * 3 * 64 * 128 * 4
  rest = (2 * 64 * (4 + 2 + 2) * 16 + 2 * 4 * 16 * 64 + 2 * 64 * 8 + 64 * 256 + 5 * 64) * 4
  one = roofline.step_bytes(cfg, 1, kv_positions=10)
  # one embedding row, top_k = 2 of the 8 experts, 10 positions of k and v in each layer
  assert one["weights"] == rest + 64 * 4 + experts * 2 // 8
  assert one["kv"] == 10 * 2 * 2 * 2 * 16 * 4
  assert one["dense_total"] == rest + 64 * 4 + experts + one["kv"]
  assert roofline.param_bytes(cfg) == rest + experts + 256 * 64 * 4
  many = roofline.step_bytes(cfg, 5000, kv_positions=10)
  assert abs(many["weights"] - roofline.param_bytes(cfg)) < 1  # every expert, every row
  assert roofline.capacity_overflow(cfg, 1) == 0.0 and 0 < roofline.capacity_overflow(cfg, 8) < 1


def test_the_gpu_configs_build_and_fit_the_cards_they_name():
  gb = 1e9
  # weights + the serving batch's KV cache within the 95% of the card JAX is allowed to take
  for config, card in ((qwen3_moe, 80 * gb), (mixtral_8x7b, 141 * gb)):
    cd = config.get_config()
    cfg = launch_config.model_config(cd)
    kv = roofline.step_bytes(cfg, max(cd.decode_batches), cd.context_len + cd.decode_steps)["kv"]
    assert roofline.param_bytes(cfg) + kv < 0.95 * card, config.__name__
    assert set(cd.kernels) <= set(roofline.KERNEL_VARIANTS) and cd.baseline == "none"
  assert roofline.param_bytes(launch_config.model_config(mixtral_8x7b.get_config())) > 80 * gb
  cd = failover_gpu.get_config()
  cfg = launch_config.model_config(cd)
  assert 0.5 * gb < roofline.param_bytes(cfg) < 4 * gb
  assert launch_config.engine_config(cd).plan.num_ew == 4 and cd.runtime == "process"
