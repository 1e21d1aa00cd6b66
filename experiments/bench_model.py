"""Prefill and greedy-decode throughput of tarragon_jax vs Hugging Face eager PyTorch on CPU.

  PYTHONPATH=. python -m experiments.bench_model --config=configs/tiny.py

Builds a random HF Mixtral of the config's shape locally (no download), saves it, loads that one
checkpoint into both implementations, then times batch_size requests: a prompt_len-token prefill
and gen_len greedy decode steps. Repetitions of the two alternate (ours, HF, HF, ours, ...) so
machine noise hits both alike; one warmup run of each (compiles included) is not timed. Prints a
table with ours/HF ratios and whether both emit the same greedy tokens; writes bench.jsonl (one
row per timed run) and summary.json to the workdir.
"""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, logging

import tarragon_jax as tj
from experiments import launch_config

_CONFIG, _WORKDIR, _ = launch_config.define_flags("configs/tiny.py", cache=False)

# transformers 5.x renamed the KV-cache argument and output field from `past_key_values` to `cache`.
_HF_FORWARD_ARGS = inspect.signature(transformers.MixtralForCausalLM.forward).parameters
_HF_CACHE = "cache" if "cache" in _HF_FORWARD_ARGS else "past_key_values"


def hf_mixtral(cfg: tj.ModelConfig, seed: int, path: str):
  """Saves a random HF Mixtral with `cfg`'s architecture to `path` (safetensors + config.json)."""
  if cfg.family != "mixtral" or cfg.qk_norm or cfg.attention_bias or cfg.shared_expert_hidden:
    raise app.UsageError(f"the HF baseline is MixtralForCausalLM; {cfg} is not a Mixtral shape")
  hf_cfg = transformers.MixtralConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.expert_hidden,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, rms_norm_eps=cfg.rms_eps,
      rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
      sliding_window=cfg.sliding_window, tie_word_embeddings=cfg.tie_embeddings)
  torch.manual_seed(seed)
  transformers.MixtralForCausalLM(hf_cfg).save_pretrained(path)


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def greedy_step(params, cfg: tj.ModelConfig, cache: tj.KVCache, tokens, slots, n_new):
  """`tj.extend` then argmax: (i32[B, 1] next tokens, cache)."""
  logits, cache = tj.extend(params, cfg, cache, tokens, slots, n_new)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None], cache


def run_ours(params, cfg: tj.ModelConfig, prompt: np.ndarray, gen_len: int):
  """Greedy generation with a slot KV cache: (i32[B, gen_len + 1], prefill s, decode s)."""
  B, P = prompt.shape
  slots = jnp.arange(B, dtype=jnp.int32)
  prompt, n_prompt, n_one = (jnp.asarray(prompt, jnp.int32), jnp.full((B,), P, jnp.int32),
                             jnp.ones((B,), jnp.int32))
  cache = jax.block_until_ready(tj.KVCache.create(cfg, B))
  t0 = time.perf_counter()
  tok, cache = greedy_step(params, cfg, cache, prompt, slots, n_prompt)
  out = [tok.block_until_ready()]
  t1 = time.perf_counter()
  for _ in range(gen_len):
    tok, cache = greedy_step(params, cfg, cache, tok, slots, n_one)
    out.append(tok)
  tok.block_until_ready()
  t2 = time.perf_counter()
  return np.concatenate(jax.device_get(out), axis=1), t1 - t0, t2 - t1


@torch.no_grad()
def run_hf(model, prompt: np.ndarray, gen_len: int):
  """The same greedy loop with HF's own KV cache: (i32[B, gen_len + 1], prefill s, decode s)."""
  ids = torch.from_numpy(prompt).long()
  t0 = time.perf_counter()
  res = model(ids, use_cache=True)
  tok = res.logits[:, -1].argmax(-1, keepdim=True)
  out = [tok]
  t1 = time.perf_counter()
  for _ in range(gen_len):
    res = model(tok, use_cache=True, **{_HF_CACHE: getattr(res, _HF_CACHE)})
    tok = res.logits[:, -1].argmax(-1, keepdim=True)
    out.append(tok)
  t2 = time.perf_counter()
  return torch.cat(out, dim=1).numpy().astype(np.int32), t1 - t0, t2 - t1


def main(argv):
  del argv
  cd = _CONFIG.value
  cfg = launch_config.model_config(cd)
  B, P, G = cd.batch_size, cd.prompt_len, cd.gen_len
  if P + G > cfg.max_seq_len:
    raise app.UsageError(f"prompt_len + gen_len = {P + G} exceeds max_seq_len={cfg.max_seq_len}")
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  torch.set_num_threads(os.cpu_count())

  with tempfile.TemporaryDirectory() as ckpt:
    hf_mixtral(cfg, cd.seed, ckpt)
    loaded, params = tj.load_hf_checkpoint(ckpt, max_seq_len=cfg.max_seq_len, dtype=cfg.dtype,
                                           expert_kernel=cfg.expert_kernel)
    model = transformers.MixtralForCausalLM.from_pretrained(
        ckpt, dtype=getattr(torch, cfg.dtype), attn_implementation=cd.hf_attn,
        experts_implementation=cd.hf_experts).eval()
  if loaded.replace(capacity_factor=cfg.capacity_factor) != cfg:
    raise RuntimeError(f"the HF checkpoint imports as {loaded}, not the configured {cfg}")

  prompt = np.random.default_rng(cd.seed).integers(0, cfg.vocab_size, (B, P), dtype=np.int32)
  runners = {"ours": lambda: run_ours(params, cfg, prompt, G),
             "hf": lambda: run_hf(model, prompt, G)}
  tokens = {name: run()[0] for name, run in runners.items()}  # warmup: compiles, allocator, caches
  logging.info("warmup done; timing %d interleaved repetitions", cd.reps)
  load_before = os.getloadavg()[0]  # other processes on these cores skew HF's OpenMP far more
  records = []
  for rep in range(cd.reps):
    for name in ("ours", "hf") if rep % 2 == 0 else ("hf", "ours"):
      toks, prefill_s, decode_s = runners[name]()
      if not np.array_equal(toks, tokens[name]):
        raise RuntimeError(f"{name}: greedy tokens changed between repetitions")
      records.append({"rep": rep, "impl": name, "prefill_s": prefill_s, "decode_s": decode_s,
                      "prefill_tok_s": B * P / prefill_s, "decode_tok_s": B * G / decode_s})

  def median(name, key):
    return float(np.median([r[key] for r in records if r["impl"] == name]))

  load = (load_before, os.getloadavg()[0])
  same = tokens["ours"] == tokens["hf"]
  rows_equal = int(np.all(same, axis=1).sum())
  first_diff = [int(np.argmin(row)) if not row.all() else None for row in same]
  summary = {
      "batch_size": B, "prompt_len": P, "gen_len": G, "reps": cd.reps,
      "jax_backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
      "hf_attn": cd.hf_attn, "hf_experts": cd.hf_experts, "cpu_count": os.cpu_count(),
      "load_avg_1min_before_after": load,
      "greedy_rows_equal": rows_equal, "greedy_tokens_equal": int(same.sum()),
      "greedy_tokens_total": int(same.size), "first_difference_per_row": first_diff,
  }
  for key in ("prefill_tok_s", "decode_tok_s"):
    for name in runners:
      summary[f"{name}_{key}"] = median(name, key)
    summary[f"ratio_{key}"] = summary[f"ours_{key}"] / summary[f"hf_{key}"]
  launch_config.write_jsonl(os.path.join(workdir, "bench.jsonl"), records)
  launch_config.write_summary(workdir, summary, cd)

  print(f"B={B} requests, prompt {P}, {G} greedy steps; medians of {cd.reps} interleaved reps; "
        f"ours on JAX {jax.default_backend()}, HF {transformers.__version__} eager "
        f"(attn={cd.hf_attn}, experts={cd.hf_experts}) on {torch.get_num_threads()} torch threads")
  print(f"{'':16}{'ours':>12}{'HF':>12}{'ours/HF':>10}")
  for key, label in (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s")):
    print(f"{label:16}{summary[f'ours_{key}']:12.0f}{summary[f'hf_{key}']:12.0f}"
          f"{summary[f'ratio_{key}']:10.2f}")
  ms = {name: 1e3 * median(name, "decode_s") / G for name in runners}
  print(f"{'decode ms/step':16}{ms['ours']:12.3f}{ms['hf']:12.3f}{ms['ours'] / ms['hf']:10.2f}")
  print(f"greedy tokens equal: {rows_equal}/{B} rows, {summary['greedy_tokens_equal']}/"
        f"{same.size} tokens")
  print(f"1-min load average {load[0]:.1f} before, {load[1]:.1f} after, on {os.cpu_count()} cores"
        + (": other processes were running, so these figures are unreliable"
           if max(load) > os.cpu_count() else ""))


if __name__ == "__main__":
  app.run(main)
