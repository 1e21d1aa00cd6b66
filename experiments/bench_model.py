"""Model throughput: against Hugging Face on CPU, or against the memory-bandwidth roofline.

  python -m experiments.bench_model --config=configs/tiny.py
  python -m experiments.bench_model --config=configs/bench_model_roofline.py

`baseline = "hf"` (configs/tiny.py): builds a random HF Mixtral of the config's shape locally (no
download), saves it, loads that one checkpoint into both implementations, then times batch_size
requests: a prompt_len-token prefill and gen_len greedy decode steps. Repetitions of the two
alternate (ours, HF, HF, ours, ...) so machine noise hits both alike; one warmup run of each
(compiles included) is not timed. Prints a table with ours/HF ratios and whether both emit the
same greedy tokens; writes bench.jsonl (one row per timed run) and summary.json to the workdir.

`baseline = "none"` (configs/bench_model_roofline.py, and the real shapes configs/qwen3_moe.py and
configs/mixtral_8x7b.py on a GPU host): no torch, no checkpoint. Measures the device's memory
bandwidth, makes random weights on the device in the config's dtype, then times `tj.extend`
decode steps at each of `decode_batches` over a KV cache holding `context_len` positions per row,
for each expert kernel of `kernels` (experiments/roofline.py's variants, interleaved repetitions).
Prints kernel, batch, ms/step, tokens/s, GB a step must read and the fraction of the measured
bandwidth that reaches (experiments/roofline.py states the byte model); writes bench.jsonl (one
row per timed run, rewritten after each batch) and summary.json.
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
from absl import app

import tarragon_jax as tj
from experiments import launch_config, roofline

# The HF and roofline modes read different fields: only those both read are required up front.
_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags(
    "configs/tiny.py", required=("model", "seed", "workdir", "reps"))
_GB = 1e9
# `tj.extend` as one jitted function (of the config, static, and the arrays), lowered and
# compiled per kernel variant.
_EXTEND = jax.jit(tj.extend, static_argnames="config", donate_argnames="cache")


# --- baseline "hf": against Hugging Face eager PyTorch on CPU ---------------------------------
# torch and transformers are imported only here: the roofline mode runs where they are absent.


def hf_mixtral(cfg: tj.ModelConfig, seed: int, path: str):
  """Saves a random HF Mixtral with `cfg`'s architecture to `path` (safetensors + config.json)."""
  import torch
  import transformers

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


def run_hf(model, prompt: np.ndarray, gen_len: int):
  """The same greedy loop with HF's own KV cache: (i32[B, gen_len + 1], prefill s, decode s)."""
  import torch

  # transformers 5.x renamed the KV-cache argument and output field from `past_key_values` to
  # `cache`.
  cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
      else "past_key_values"
  with torch.no_grad():
    ids = torch.from_numpy(prompt).long()
    t0 = time.perf_counter()
    res = model(ids, use_cache=True)
    tok = res.logits[:, -1].argmax(-1, keepdim=True)
    out = [tok]
    t1 = time.perf_counter()
    for _ in range(gen_len):
      res = model(tok, use_cache=True, **{cache_arg: getattr(res, cache_arg)})
      tok = res.logits[:, -1].argmax(-1, keepdim=True)
      out.append(tok)
    t2 = time.perf_counter()
  return torch.cat(out, dim=1).numpy().astype(np.int32), t1 - t0, t2 - t1


def compare_with_hf(cd, cfg: tj.ModelConfig, workdir: str):
  """The HF comparison: interleaved timed repetitions, greedy-token agreement, the table."""
  import torch
  import transformers

  B, P, G = cd.batch_size, cd.prompt_len, cd.gen_len
  if P + G > cfg.max_seq_len:
    raise app.UsageError(f"prompt_len + gen_len = {P + G} exceeds max_seq_len={cfg.max_seq_len}")
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
  launch_config.progress("warmup done; timing %d interleaved repetitions", cd.reps)
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


# --- baseline "none": decode against the memory-bandwidth roofline ----------------------------


def decode_run(fn, params, cache: tj.KVCache, tokens: list, slots, n_one, context_len: int):
  """len(tokens) decode steps of compiled `tj.extend` from `context_len` cached positions per
  row (the lengths are reset; the KV stays): (seconds, cache)."""
  cache = tj.KVCache(cache.k, cache.v, jnp.full_like(cache.lengths, context_len))
  jax.block_until_ready(cache.lengths)
  t0 = time.perf_counter()
  for tok in tokens:
    logits, cache = fn(params, cache, tok, slots, n_one)
  logits.block_until_ready()
  return time.perf_counter() - t0, cache


def _check_memory(cfg: tj.ModelConfig, device, batch: int, max_len: int):
  """Refuses, with the sizes, a model and KV cache that cannot fit the device's memory."""
  limit = (device.memory_stats() or {}).get("bytes_limit")
  kv = 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * cfg.head_dim \
      * jnp.dtype(cfg.dtype).itemsize
  need = roofline.param_bytes(cfg) + kv
  if limit and need > limit:
    raise app.UsageError(
        f"weights ({roofline.param_bytes(cfg) / _GB:.1f} GB) and the batch-{batch} KV cache "
        f"({kv / _GB:.1f} GB) need {need / _GB:.1f} GB; {device.device_kind} gives JAX "
        f"{limit / _GB:.1f} GB: use a larger card, XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX "
        "takes 75% by default), or a smaller decode_batches / context_len")


def _time_batch(params, cfg: tj.ModelConfig, cd, batch: int, bandwidth: float, info: dict):
  """Every kernel at one batch: compile, one untimed run, then `reps` interleaved timed runs.
  A kernel that does not compile or run is reported in `info` and skipped. Returns the rows."""
  S, steps = cd.context_len, cd.decode_steps
  cache = tj.KVCache.create(cfg, batch, max_len=S + steps)
  slots, n_one = jnp.arange(batch, dtype=jnp.int32), jnp.ones((batch,), jnp.int32)
  # Fresh random tokens, not greedy ones: from random weights every row would soon feed the same
  # token, and route to the same experts.
  drawn = jax.random.randint(jax.random.key(cd.seed + batch), (steps, batch, 1), 0,
                             cfg.vocab_size, jnp.int32)
  tokens = [drawn[i] for i in range(steps)]
  compiled = {}
  for name in cd.kernels:
    t0 = time.perf_counter()
    try:
      fn, calls = roofline.compile_variant(_EXTEND, name, (params, cache, tokens[0], slots,
                                                            n_one), cfg)
      _, cache = decode_run(fn, params, cache, tokens, slots, n_one, S)  # untimed
    except Exception as e:  # noqa: BLE001 (a lowering this JAX, XLA or device lacks is a result)
      first = (str(e).splitlines() or [""])[0][:300]
      info[name, batch] = dict(error=f"{type(e).__name__}: {first}")
      print(f"  {name} at batch {batch}: {info[name, batch]['error']}", flush=True)
      if cache.k.is_deleted():  # donated to a run that failed
        cache = tj.KVCache.create(cfg, batch, max_len=S + steps)
      continue
    compiled[name] = fn
    info[name, batch] = dict(compile_and_first_run_s=time.perf_counter() - t0, library_calls=calls)
  need = roofline.step_bytes(cfg, batch, S + (steps + 1) / 2)  # the mean length attended over
  rows = []
  for rep in range(cd.reps):
    for name in list(compiled) if rep % 2 == 0 else list(compiled)[::-1]:
      seconds, cache = decode_run(compiled[name], params, cache, tokens, slots, n_one, S)
      step_s = seconds / steps
      rows.append(dict(kernel=name, batch=batch, rep=rep, step_s=step_s, tok_s=batch / step_s,
                       bytes=need["total"], fraction=need["total"] / step_s / bandwidth,
                       fraction_all_experts=need["dense_total"] / step_s / bandwidth))
  return rows, need


_HEADER = (f"{'kernel':<15}{'batch':>6}{'ms/step':>10}{'tok/s':>10}{'GB/step':>9}"
           f"{'of measured':>13}{'of datasheet':>14}{'if all E read':>15}")


def bench_roofline(cd, cfg: tj.ModelConfig, workdir: str):
  """The roofline mode: bandwidth, random weights on the device, every (kernel, batch)."""
  unknown = sorted(set(cd.kernels) - set(roofline.KERNEL_VARIANTS))
  if unknown:
    raise app.UsageError(f"kernels {unknown}; the variants are {sorted(roofline.KERNEL_VARIANTS)}")
  if cd.context_len + cd.decode_steps > cfg.max_seq_len:
    raise app.UsageError(f"context_len + decode_steps = {cd.context_len + cd.decode_steps} "
                         f"exceeds max_seq_len={cfg.max_seq_len}")
  device = jax.devices()[0]
  _check_memory(cfg, device, max(cd.decode_batches), cd.context_len + cd.decode_steps)
  measured = roofline.measure_bandwidth(cd.bandwidth_mib << 20, cd.bandwidth_reps, device)
  bw = measured["bandwidth"]
  sheet = roofline.datasheet_bandwidth(device)
  print(f"{device.device_kind} ({jax.default_backend()}, jax {jax.__version__}): bandwidth "
        f"measured {bw / 1e12:.3f} TB/s (best of {cd.bandwidth_reps} over {cd.bandwidth_mib} "
        f"MiB: read {measured['read'] / 1e12:.3f}, read + write {measured['read_write'] / 1e12:.3f}"
        "); datasheet " + (f"{sheet[0] / 1e12:.2f} TB/s ({sheet[1]})" if sheet else "unknown"),
        flush=True)
  t0 = time.perf_counter()
  # XLA's own generator (rbg): it compiles and draws faster than threefry; quality is moot here.
  key = jax.random.key(cd.seed, impl="rbg")
  params = jax.block_until_ready(roofline.random_params(cfg, key, device))
  init_s = time.perf_counter() - t0
  print(f"{cfg.family}: {roofline.param_bytes(cfg) / _GB:.2f} GB of random {cfg.dtype} weights "
        f"made on the device in {init_s:.1f} s; context {cd.context_len}, "
        f"{cd.decode_steps} steps x {cd.reps} reps per kernel (median)", flush=True)

  records, info, needs = [], {}, {}
  print(_HEADER)
  for batch in cd.decode_batches:
    rows, needs[batch] = _time_batch(params, cfg, cd, batch, bw, info)
    records += rows
    launch_config.write_jsonl(os.path.join(workdir, "bench.jsonl"), records)
    for name in cd.kernels:  # as each batch ends: a run cut short still shows these
      if "error" not in info[name, batch]:
        _print_row(name, batch, [r for r in records if (r["kernel"], r["batch"]) == (name, batch)],
                   sheet, bw)

  summary = dict(device_kind=device.device_kind, backend=jax.default_backend(),
                 jax_version=jax.__version__, bandwidth=bw,
                 bandwidth_read=measured["read"], bandwidth_read_write=measured["read_write"],
                 bandwidth_datasheet=sheet[0] if sheet else None,
                 bandwidth_datasheet_what=sheet[1] if sheet else None,
                 param_bytes=roofline.param_bytes(cfg), init_s=init_s, rows=[])
  for (name, batch), extra in info.items():
    mine = [r for r in records if (r["kernel"], r["batch"]) == (name, batch)]
    row = dict(kernel=name, batch=batch, active_experts=needs[batch]["active_experts"],
               bytes=needs[batch]["total"], bytes_all_experts=needs[batch]["dense_total"],
               **extra)
    if mine:
      step_s = float(np.median([r["step_s"] for r in mine]))
      row.update(step_s=step_s, tok_s=batch / step_s, fraction=needs[batch]["total"] / step_s / bw)
    variant = roofline.variant_config(cfg, name)
    if variant.expert_kernel == "capacity":
      row["overflow_probability_per_layer"] = roofline.capacity_overflow(variant, batch)
    summary["rows"].append(row)
  launch_config.write_summary(workdir, summary, cd)
  _print_notes(summary["rows"], cfg)


def _print_row(name: str, batch: int, rows: list[dict], sheet, bw: float):
  step_s = float(np.median([r["step_s"] for r in rows]))
  need = rows[0]["bytes"]
  of_sheet = f"{need / step_s / sheet[0]:14.3f}" if sheet else f"{'-':>14}"
  all_e = float(np.median([r["fraction_all_experts"] for r in rows]))
  print(f"{name:<15}{batch:>6}{step_s * 1e3:10.3f}{batch / step_s:10.1f}{need / _GB:9.3f}"
        f"{need / step_s / bw:13.3f}{of_sheet}{all_e:15.3f}", flush=True)


def _print_notes(rows: list[dict], cfg: tj.ModelConfig):
  """What the table's columns mean, and per (kernel, batch) what compiled and what did not."""
  print("GB/step: weights a step must read (attention, norms, router, lm_head, the embedding rows "
        "and the experts it activates) + KV read; 'of measured': that / step time / measured "
        "bandwidth; 'if all E read': the same with every expert's weights, what a kernel that "
        "runs every expert moves")
  for r in rows:
    what = r.get("error") or (
        f"{r['active_experts']:.1f} of {cfg.num_experts} experts active per layer (expected), "
        f"compile + first run {r['compile_and_first_run_s']:.1f} s, library calls "
        f"{r['library_calls'] or 'none'}")
    if "overflow_probability_per_layer" in r and "error" not in r:
      what += f", P(capacity overflow per layer) {r['overflow_probability_per_layer']:.3f}"
    print(f"  {r['kernel']} at batch {r['batch']}: {what}")


def main(argv):
  del argv
  cd = _CONFIG.value
  cfg = launch_config.model_config(cd)
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  # Kernel variants that compile to the same program (capacity_x4 at batch 1) load, not compile.
  launch_config.enable_compile_cache(_CACHE.value)
  baseline = cd.get("baseline", "hf")
  if baseline == "hf":
    compare_with_hf(cd, cfg, workdir)
  elif baseline == "none":
    bench_roofline(cd, cfg, workdir)
  else:
    raise app.UsageError(f"baseline={baseline!r}; use 'hf' (compare with Hugging Face on CPU) or "
                         "'none' (decode against the memory-bandwidth roofline)")


if __name__ == "__main__":
  app.run(main)
