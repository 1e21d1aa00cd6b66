"""The cost model: the paper's formulas against Table 1 by hand, Tarragon's estimate, the
extrapolation to a DeepSeek-V3-sized model, and a smoke test of experiments/cost_model.py."""

import dataclasses
import json
import math

import numpy as np
import pytest
from test_serve_launcher import _run

from configs import mixtral_8x7b
from experiments import launch_config
from experiments import stall_model as cm


def test_baseline_stalls_are_table_1_by_hand():
  p = cm.paper_terms()
  # AW failure at the 64th decode iteration, layer 0: 18.5 + 32*2.18 ms + 63*32*0.85 ms.
  assert cm.baseline_stall_aw(p, 64) == pytest.approx(18.5 + 0.06976 + 1.7136, abs=1e-9)
  assert cm.baseline_stall_aw(p, 64) == pytest.approx(20.28336, abs=1e-9)
  assert cm.baseline_stall_aw(p, 64, layer=16) == pytest.approx(20.28336 + 16 * 0.85e-3)
  assert cm.baseline_stall_aw(p, 1) == pytest.approx(18.5 + 0.06976)  # only the re-prefill
  assert cm.baseline_stall_ew(p) == pytest.approx(18.50085, abs=1e-9)
  stalls = cm.baseline_stall_aw(p, np.array([1, 64]))  # vectorized over i
  np.testing.assert_allclose(stalls, [18.56976, 20.28336], atol=1e-9)
  assert p.t_step == pytest.approx(32 * 0.85e-3)


def test_recompute_counts_token_layers_and_mixtral_flops():
  p = cm.paper_terms()
  # 128 requests, 10-token prompts, AW failure at i = 64, layer 3, in token-layers:
  # 128 * [32 * 10 + (63 * 32 + 3)] = 128 * 2339.
  tokens = dataclasses.replace(p, g_pre=10.0, g_dec=1.0)
  assert cm.baseline_recompute(tokens, 64, layer=3, in_flight=128) == 128 * 2339
  # Mixtral per token and layer: attention 4096 * (4096 + 2 * 1024) + 4096 * 4096, router
  # 4096 * 8, two norms 2 * 4096, two experts of 3 * 4096 * 14336; 2 FLOPs per weight.
  arch = cm.Architecture.from_config(cm.mixtral_8x7b())
  assert arch.expert_params == 3 * 4096 * 14336
  assert arch.layer_dense_params == 4096 * 6144 + 4096 * 4096 + 4096 * 8 + 2 * 4096
  assert p.g_dec == 2 * (41_984_000 + 2 * 176_160_768) and p.g_pre == 10 * p.g_dec
  assert arch.params == 46_702_792_704  # Mixtral-8x7B: 46.7B
  assert arch.kv_bytes_per_token_layer == 4096  # the paper: 4 KiB per token and layer
  assert cm.tarragon_recompute(tokens, 3, 16) == 16 * 3  # the failed step's layers only


def test_tarragon_stall_by_hand():
  p = cm.paper_terms()  # detection 20 ms, restore 1 ms + KV at 25 GB/s, no store catch-up
  kv = 32 * 4096 * (10 + 63)  # the KV of 73 positions, every layer, at i = 64
  assert cm.tarragon_stall_aw(p, 64, 16) == pytest.approx(0.02 + 16 * (1e-3 + kv / 25e9))
  assert cm.tarragon_stall_ew(p) == pytest.approx(0.02 + 0.85e-3)
  slow = dataclasses.replace(p, catchup_s=0.5, tail_tokens=2.0)
  assert cm.tarragon_stall_aw(slow, 64, 16) == pytest.approx(
      cm.tarragon_stall_aw(p, 64, 16) + 0.5 + 2 * 32 * 0.85e-3)
  assert cm.baseline_stall_aw(p, 64) / cm.tarragon_stall_aw(p, 64, 16) > 100


def test_bad_inputs_are_rejected_with_the_value():
  p = cm.paper_terms()
  with pytest.raises(ValueError, match="i=0"):
    cm.baseline_stall_aw(p, 0)
  with pytest.raises(ValueError, match="layer=32"):
    cm.baseline_stall_aw(p, 1, layer=32)
  with pytest.raises(ValueError, match="T_w=-1"):
    dataclasses.replace(p, T_w=-1.0)
  with pytest.raises(ValueError, match="load_bw"):
    cm.Assumptions(load_bw=0.0)
  with pytest.raises(ValueError, match="raise Assumptions.load_bw"):  # 11.3 GB at 0.5 GB/s
    cm.extrapolate(cm.deepseek_v3(), ref=p, ref_arch=cm.Architecture.from_config(
        cm.mixtral_8x7b()), assume=cm.Assumptions(load_bw=0.5e9))


def test_deepseek_v3_is_the_published_size():
  d = cm.deepseek_v3()
  assert abs(d.params / 671e9 - 1) < 0.005
  assert 34e9 < d.active_params_per_layer * d.num_layers < 38e9  # 37B activated per token
  assert d.worker_weight_bytes(8) == pytest.approx(58 * 32 * 3 * 7168 * 2048)  # FP8 experts


def test_extrapolation_reproduces_its_reference_and_is_monotone():
  p = cm.paper_terms()
  mixtral = cm.Architecture.from_config(cm.mixtral_8x7b())
  same = cm.extrapolate(mixtral, ref=p, ref_arch=mixtral)
  for field in ("T_w", "t_pre", "t_dec", "g_pre", "g_dec", "kv_bytes_per_token"):
    assert getattr(same, field) == pytest.approx(getattr(p, field)), field
  d = cm.extrapolate(cm.deepseek_v3(), ref=p, ref_arch=mixtral)
  assert d.T_w > p.T_w and d.t_dec > p.t_dec and d.g_dec > p.g_dec
  i = np.arange(1, 513)
  for c in (p, d):
    assert np.all(np.diff(cm.baseline_stall_aw(c, i)) > 0)
    assert np.all(np.diff(cm.tarragon_stall_aw(c, i, 16)) > 0)  # more KV to restore
    assert np.all(np.diff(cm.baseline_recompute(c, i, in_flight=128)) > 0)
    assert np.all(cm.tarragon_stall_aw(c, i, 16) < cm.baseline_stall_aw(c, i))
  assert np.all(cm.baseline_stall_aw(d, i) > cm.baseline_stall_aw(p, i))
  # A bigger model is slower to restart and to decode; a faster disk restarts sooner.
  bigger = dataclasses.replace(cm.deepseek_v3(), expert_params=2 * cm.deepseek_v3().expert_params)
  b = cm.extrapolate(bigger, ref=p, ref_arch=mixtral)
  assert b.T_w > d.T_w and b.t_dec > d.t_dec and b.t_pre > d.t_pre
  fast = cm.extrapolate(cm.deepseek_v3(), ref=p, ref_arch=mixtral,
                        assume=cm.Assumptions(load_bw=8e9))
  assert fast.T_w < d.T_w
  assert cm.extrapolate(cm.deepseek_v3(), ref=p, ref_arch=mixtral, num_ew=32).T_w < d.T_w


def test_fit_restore_recovers_a_line_and_ignores_a_narrow_spread():
  line = [(b, 1e-3 + 2e-9 * b) for b in (1_000, 10_000, 100_000)]
  r0, beta = cm.fit_restore(line)
  assert r0 == pytest.approx(1e-3) and beta == pytest.approx(2e-9)
  assert cm.fit_restore([(1000, 3e-3), (1200, 1e-3), (1100, 2e-3)]) == (2e-3, 0.0)


def test_mixtral_shape_is_the_configs():
  assert cm.mixtral_8x7b() == launch_config.model_config(mixtral_8x7b.get_config())


def _finite(x) -> bool:
  return all(math.isfinite(v) for v in x)


def test_launcher_calibrates_compares_and_extrapolates(tmp_path):
  out = _run("experiments.cost_model", "--config=configs/cost_model_tiny.py",
             f"--workdir={tmp_path}", "--config.num_aw=2", "--config.num_ew=2",
             "--config.slots_per_aw=4", "--config.requests=4", "--config.fault_token_index=2",
             "--config.extra_tokens=1", "--config.failure_reps=1", "--config.calibration.reps=2",
             "--config.calibration.decode_steps=3", "--config.calibration.layer_reps=1",
             "--config.max_token_index=16")
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert len(summary["terms"]) == 3
  for name, terms in summary["terms"].items():
    assert _finite([terms[k] for k in ("T_w", "t_pre", "t_dec", "g_pre", "g_dec", "t_step")]), name
    assert terms["T_w"] > 0 and terms["t_dec"] > 0, name
  runs = {(c["mode"], c["fault"]): c for c in summary["comparisons"]}
  assert set(runs) == {(m, f) for m in ("global_restart", "tarragon") for f in ("aw", "ew")}
  for key, c in runs.items():
    assert _finite([c["predicted_s"], c["measured_s"], c["rel_err"]]) and c["measured_s"] > 0, key
  assert runs["global_restart", "aw"]["recomputed_tokens"] == dict(predicted=4 * 11, measured=44)
  records = launch_config.read_jsonl(tmp_path / "results.jsonl")
  curves = [r for r in records if r["kind"] == "extrapolation"]
  assert len(curves) == 3 * 16
  assert all(_finite([r["baseline_aw_s"], r["tarragon_aw_s"]]) for r in curves)
  assert (tmp_path / "cost_model.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "predicted" in out and "DeepSeek-V3-sized" in out


def test_launcher_reads_a_failover_summary(tmp_path):
  runs = [dict(mode="global_restart", fault=f, service_stall_s=1.5,
               restart_phases=[dict(total_s=1.2)]) for f in ("aw", "ew")]
  runs += [dict(mode="tarragon", fault="aw", service_stall_s=0.02, restores=2, restore_bytes=8192,
                restore_s_max=1e-3, detection_s=[1e-5], tbt_before_s=0.01),
           dict(mode="tarragon", fault="ew", service_stall_s=0.01)]
  path = tmp_path / "failover.json"
  path.write_text(json.dumps(dict(runs=runs, config=dict(num_aw=2, num_ew=2, slots_per_aw=4))))
  _run("experiments.cost_model", "--config=configs/cost_model_tiny.py",
       f"--workdir={tmp_path / 'out'}", f"--failover_summary={path}",
       "--config.calibration.reps=2", "--config.calibration.decode_steps=3",
       "--config.calibration.layer_reps=1", "--config.max_token_index=8")
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["source"] == str(path)
  assert [c["measured_s"] for c in summary["comparisons"]] == [1.5, 1.5, 0.02, 0.01]
  assert all(_finite([c["predicted_s"]]) for c in summary["comparisons"])
