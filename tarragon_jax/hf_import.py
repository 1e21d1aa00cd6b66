"""Import of Hugging Face checkpoints (config.json + safetensors) for three MoE families.

Supported `model_type`s: "mixtral", "qwen3_moe", "qwen2_moe". Weights are read tensor by tensor
with safetensors (bf16 too, via ml_dtypes) and laid out as `ModelParams`: Linear weights
[out, in] become [in, out], attention projections get explicit head axes, experts are stacked
on E, layers on L.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.params import (
  AttentionParams,
  ExpertParams,
  LayerParams,
  ModelParams,
  MoEParams,
  SharedExpertParams,
  param_specs,
)

SUPPORTED = ("mixtral", "qwen3_moe", "qwen2_moe")


class CheckpointError(ValueError):
  """A checkpoint that cannot be imported; the message names what is wrong."""


ROPE_TYPES = ("default",)  # the rope `layers/attention.py` implements: unscaled


def _rope_theta(hf: dict) -> float:
  """The rope base frequency; CheckpointError for a rope this library does not implement.

  Rope settings appear in `rope_scaling` (older transformers: `type` or `rope_type`) and/or
  `rope_parameters` (newer: `rope_type` and `rope_theta`, or one such dict per layer type). A
  config may carry both (a yarn `rope_scaling` beside a default `rope_parameters`), so every
  one is checked, not just the first found.
  """
  thetas = {}
  for field in ("rope_scaling", "rope_parameters"):
    block = hf.get(field)
    if block is None:
      continue
    if not isinstance(block, dict):
      raise CheckpointError(f"{field}={block!r} is not supported; give a dict or null")
    by_layer_type = bool(block) and all(isinstance(v, dict) for v in block.values())
    for where, rope in (block.items() if by_layer_type else [(None, block)]):
      name = field if where is None else f"{field}[{where!r}]"
      for key in ("rope_type", "type"):
        if rope.get(key) not in (None, *ROPE_TYPES):
          raise CheckpointError(f"{name} has {key}={rope[key]!r}, which is not supported; "
                                f"supported rope types: {ROPE_TYPES} (no rope scaling)")
      if rope.get("rope_theta") is not None:
        thetas[f"{name}['rope_theta']"] = rope["rope_theta"]
  if not thetas:
    thetas["rope_theta"] = hf.get("rope_theta") or 10_000.0
  for name, theta in thetas.items():
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
      raise CheckpointError(f"{name}={theta!r}; the rope base must be a number > 0")
  if len(set(thetas.values())) > 1:
    given = ", ".join(f"{name}={theta!r}" for name, theta in thetas.items())
    raise CheckpointError(f"the rope base differs between fields ({given}); only one rope_theta "
                          "for every layer is supported")
  return float(next(iter(thetas.values())))


def _field(hf: dict, *names: str):
  """The first of `names` present in `hf` (field names moved between transformers versions)."""
  for name in names:
    if hf.get(name) is not None:
      return hf[name]
  raise KeyError(" or ".join(names))


def config_from_hf(hf: dict, *, max_seq_len: int | None = None,
                   dtype: str = "float32") -> ModelConfig:
  """Maps a Hugging Face config.json dict to a ModelConfig; CheckpointError if unsupported."""
  family = hf.get("model_type")
  if family not in SUPPORTED:
    raise CheckpointError(f"model_type={family!r} is not supported; supported: {SUPPORTED}")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported; only 'silu' is")
  if family != "mixtral":
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
      raise CheckpointError(
          f"dense MLP layers (mlp_only_layers={hf.get('mlp_only_layers')}, decoder_sparse_step="
          f"{hf.get('decoder_sparse_step')}) are not supported; every layer must be MoE")
  if family != "mixtral" and hf.get("use_sliding_window", False):
    raise CheckpointError(
        f"use_sliding_window=True is not supported for {family}: its window applies to some "
        "layers only (layer_types / max_window_layers); set it to false or use full attention")
  if family == "qwen3_moe" and hf.get("attention_bias", False):
    raise CheckpointError("qwen3_moe with attention_bias=True (an o_proj bias) is not supported")
  heads = hf["num_attention_heads"]
  window = (hf.get("sliding_window") or None) if family == "mixtral" else None
  common = dict(
      family=family,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      top_k=hf["num_experts_per_tok"],
      rms_eps=float(hf["rms_norm_eps"]),
      rope_theta=_rope_theta(hf),
      max_seq_len=max_seq_len or min(int(hf.get("max_position_embeddings", 2048)), 2048),
      sliding_window=window,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      dtype=dtype,
  )
  if family == "mixtral":
    return ModelConfig(**common, num_experts=_field(hf, "num_local_experts", "num_experts"),
                       expert_hidden=hf["intermediate_size"], norm_topk_prob=True)
  if family == "qwen3_moe":
    return ModelConfig(**common, num_experts=_field(hf, "num_experts", "num_local_experts"),
                       expert_hidden=hf["moe_intermediate_size"],
                       norm_topk_prob=bool(hf.get("norm_topk_prob", False)), qk_norm=True)
  return ModelConfig(**common, num_experts=_field(hf, "num_experts", "num_local_experts"),
                     expert_hidden=hf["moe_intermediate_size"],
                     shared_expert_hidden=hf.get("shared_expert_intermediate_size", 0),
                     norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                     attention_bias=bool(hf.get("qkv_bias", hf.get("attention_bias", True))))


def _safe_open(file: str):
  """safe_open(file), with an unreadable file named in the error (safetensors does not)."""
  try:
    return safe_open(file, "np")
  except FileNotFoundError:
    raise CheckpointError(f"{file} is missing") from None
  except SafetensorError as e:
    raise CheckpointError(f"{file} is not a readable safetensors file; it is truncated or corrupt "
                          f"({e}): download or save it again") from e


class _Tensors:
  """Lazy name -> tensor lookup over one or many safetensors files."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          weight_map = e
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} is not a safetensors index: it needs a JSON object with "
                              f"a weight_map of tensor name -> file name ({weight_map!r})")
      self._where = {k: os.path.join(path, v) for k, v in weight_map.items()}
      # Each shard's header is read now (its tensors stay on disk), so that a missing, truncated
      # or corrupt shard is reported when the checkpoint is opened, not midway through a load.
      self._open: dict[str, Any] = {f: _safe_open(f) for f in sorted(set(self._where.values()))}
    elif os.path.exists(single):
      self._open = {single: _safe_open(single)}
      self._where = {k: single for k in self._open[single].keys()}
    else:
      raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
    return self._open[self._where[name]].get_tensor(name)


def _expert_names(family: str) -> tuple[str, tuple[str, str, str], str]:
  """(MoE module prefix, (gate, up, down) projection names, router name) per family."""
  if family == "mixtral":
    return "block_sparse_moe", ("w1", "w3", "w2"), "gate"
  return "mlp", ("gate_proj", "up_proj", "down_proj"), "gate"


def params_from_hf(t: Callable[[str], np.ndarray], cfg: ModelConfig) -> ModelParams:
  """Lays HF tensors (looked up by name through `t`) out as ModelParams (numpy leaves)."""
  L, E, N, K, H = (cfg.num_layers, cfg.num_experts, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
  moe_name, (g_name, u_name, d_name), router_name = _expert_names(cfg.family)

  def named(name: str, fn=lambda a: a, shape=None):
    """fn(tensor `name`), with any layout error reported against the tensor's name."""
    a = t(name)
    if shape is not None and tuple(a.shape) != shape:
      raise CheckpointError(f"tensor {name!r} has shape {tuple(a.shape)}; config.json implies "
                            f"{shape}")
    try:
      return fn(a)
    except ValueError as e:
      raise CheckpointError(f"tensor {name!r} has shape {tuple(a.shape)}, which does not fit "
                            f"config.json: {e}") from e

  def stack(fmt: str, fn=lambda a: a):
    first = named(fmt.format(l=0), fn)
    rest = [named(fmt.format(l=l), fn) for l in range(1, L)]
    for l, a in enumerate(rest, 1):
      if a.shape != first.shape:
        raise CheckpointError(f"tensor {fmt.format(l=l)!r} does not have the shape of layer 0's")
    return np.stack([first] + rest)

  def linear(fmt, *out_shape):  # HF [out, in] -> [in, *out_shape]
    return stack(fmt, lambda a: a.T.reshape(a.shape[1], *out_shape))

  attn_p = "model.layers.{l}.self_attn."
  attn = AttentionParams(
      wq=linear(attn_p + "q_proj.weight", N, H),
      wk=linear(attn_p + "k_proj.weight", K, H),
      wv=linear(attn_p + "v_proj.weight", K, H),
      wo=stack(attn_p + "o_proj.weight", lambda a: a.T.reshape(N, H, a.shape[0])),
  )
  if cfg.attention_bias:
    attn = AttentionParams(**{**attn.__dict__,
                              "bq": stack(attn_p + "q_proj.bias", lambda a: a.reshape(N, H)),
                              "bk": stack(attn_p + "k_proj.bias", lambda a: a.reshape(K, H)),
                              "bv": stack(attn_p + "v_proj.bias", lambda a: a.reshape(K, H))})
  if cfg.qk_norm:
    attn = AttentionParams(**{**attn.__dict__, "q_norm": stack(attn_p + "q_norm.weight"),
                              "k_norm": stack(attn_p + "k_norm.weight")})

  moe_p = "model.layers.{l}." + moe_name + "."

  def experts(proj: str):
    names = [[(moe_p + f"experts.{e}.{proj}.weight").format(l=l) for e in range(E)]
             for l in range(L)]
    shape = tuple(t(names[0][0]).shape)
    return np.stack([np.stack([named(n, np.transpose, shape) for n in row]) for row in names])

  shared = None
  if cfg.shared_expert_hidden:
    shared = SharedExpertParams(
        w_gate=stack(moe_p + "shared_expert.gate_proj.weight", np.transpose),
        w_up=stack(moe_p + "shared_expert.up_proj.weight", np.transpose),
        w_down=stack(moe_p + "shared_expert.down_proj.weight", np.transpose),
        gate=stack(moe_p + "shared_expert_gate.weight", lambda a: a[0]),
    )
  layers = LayerParams(
      attn_norm=stack("model.layers.{l}.input_layernorm.weight"),
      attn=attn,
      mlp_norm=stack("model.layers.{l}.post_attention_layernorm.weight"),
      moe=MoEParams(
          router=stack(moe_p + router_name + ".weight", np.transpose),
          experts=ExpertParams(experts(g_name), experts(u_name), experts(d_name)),
          shared=shared,
      ),
  )
  embed = t("model.embed_tokens.weight")
  head = embed if cfg.tie_embeddings else t("lm_head.weight")
  return ModelParams(embed=embed, layers=layers, final_norm=t("model.norm.weight"),
                     lm_head=np.ascontiguousarray(head.T))


def _check_shapes(params: ModelParams, cfg: ModelConfig):
  want = jax.tree_util.tree_flatten_with_path(param_specs(cfg),
                                              is_leaf=lambda s: hasattr(s, "axes"))[0]
  got = jax.tree.leaves(params)
  for (path, spec), arr in zip(want, got):
    if tuple(arr.shape) != spec.shape:
      raise CheckpointError(f"weight {jax.tree_util.keystr(path)} has shape {tuple(arr.shape)}; "
                            f"config.json implies {spec.shape}")


def load_hf_checkpoint(path: str, *, max_seq_len: int | None = None, dtype: str = "float32",
                       expert_kernel: str = "auto") -> tuple[ModelConfig, ModelParams]:
  """Loads a Hugging Face MoE checkpoint directory.

  Args:
    path: directory with config.json and model.safetensors (or a sharded index).
    max_seq_len: KV-cache capacity per request; default min(max_position_embeddings, 2048).
    dtype: "float32" or "bfloat16" for the loaded parameters.
    expert_kernel: see ModelConfig.expert_kernel.
  Returns:
    (config, params) with params as jax arrays on the default device.
  Raises:
    CheckpointError: unsupported architecture, missing file or tensor, or a shape mismatch.
  """
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise CheckpointError(f"{path}: no config.json")
  with open(config_path) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
  try:
    cfg = config_from_hf(hf, max_seq_len=max_seq_len, dtype=dtype)
  except KeyError as e:
    raise CheckpointError(f"{config_path} lacks the field {e.args[0]!r}") from e
  cfg = cfg.replace(expert_kernel=expert_kernel)
  tensors = _Tensors(path)
  params = params_from_hf(tensors.get, cfg)
  _check_shapes(params, cfg)
  dt = jnp.dtype(dtype)
  return cfg, jax.tree.map(lambda a: jnp.asarray(a, dtype=dt), params)
