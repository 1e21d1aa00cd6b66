"""Import of Hugging Face checkpoints (config.json + safetensors) for three MoE families.

Supported `model_type`s: "mixtral", "qwen3_moe", "qwen2_moe". Weights are read tensor by tensor
with safetensors (bf16 too, via ml_dtypes), straight into the devices' shards, and laid out as
`ModelParams`: Linear weights [out, in] become [in, out], attention projections get explicit head
axes, experts are stacked on E, layers on L.
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
  slot_index,
  without_experts,
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

  def _file(self, name: str):
    if name not in self._where:
      raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
    return self._open[self._where[name]]

  def shape(self, name: str) -> tuple[int, ...]:
    """From the file's header: no tensor data is read."""
    return tuple(self._file(name).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    return self._file(name).get_tensor(name)


class _Weight:
  """One weight of ModelParams, made of HF tensors stacked on its leading axes (none; layers;
  layers and experts) after a per-tensor layout change `fn`.

  Its shape comes from the files' headers, and a region of it reads only the tensors the region
  needs: a load onto a mesh holds one shard at a time in host memory, never the whole model.
  """

  def __init__(self, tensors: _Tensors, names: np.ndarray, fn: Callable = lambda a: a):
    """`names`: the tensor names, shaped as the leading axes; every tensor must have the
    first's shape."""
    self.tensors, self.names, self.fn = tensors, names, fn
    first = names.flat[0]
    want = tensors.shape(first)
    for name in names.flat:
      got = tensors.shape(name)
      if got != want:
        raise CheckpointError(f"tensor {name!r} has shape {got}; {first!r} has {want}, and "
                              f"every layer's (and expert's) must be alike")
    try:
      inner = jax.eval_shape(lambda a: fn(a), jax.ShapeDtypeStruct(want, np.float32)).shape
    except (ValueError, TypeError) as e:
      raise CheckpointError(f"tensor {first!r} has shape {want}, which does not fit "
                            f"config.json: {e}") from e
    self.shape = names.shape + tuple(inner)

  def read(self, index: tuple[slice, ...] = ()) -> np.ndarray:
    """The region `index` (slices, as `jax.make_array_from_callback` gives them)."""
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
    lead = self.names.ndim
    names, rest = np.asarray(self.names[index[:lead]], dtype=object), index[lead:]
    out = None
    for i in np.ndindex(names.shape):
      part = np.asarray(self.fn(self.tensors.get(names[i])))[rest]
      if out is None:
        out = np.empty(names.shape + part.shape, part.dtype)
      out[i] = part
    return out


def _expert_names(family: str) -> tuple[str, tuple[str, str, str], str]:
  """(MoE module prefix, (gate, up, down) projection names, router name) per family."""
  if family == "mixtral":
    return "block_sparse_moe", ("w1", "w3", "w2"), "gate"
  return "mlp", ("gate_proj", "up_proj", "down_proj"), "gate"


def params_from_hf(t: _Tensors, cfg: ModelConfig) -> ModelParams:
  """Lays HF tensors out as ModelParams of `_Weight`s (nothing read yet but headers)."""
  L, E, N, K, H = (cfg.num_layers, cfg.num_experts, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
  moe_name, (g_name, u_name, d_name), router_name = _expert_names(cfg.family)

  def names(fmt: str, experts: bool = False) -> np.ndarray:
    grid = [[fmt.format(l=l, e=e) for e in range(E)] if experts else fmt.format(l=l)
            for l in range(L)]
    return np.array(grid, dtype=object)

  def stack(fmt: str, fn=lambda a: a):
    return _Weight(t, names(fmt), fn)

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
    return _Weight(t, names(moe_p + "experts.{e}." + proj + ".weight", experts=True), np.transpose)

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

  def single(name: str, fn=lambda a: a):
    return _Weight(t, np.array(name, dtype=object), fn)

  head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
  return ModelParams(embed=single("model.embed_tokens.weight"), layers=layers,
                     final_norm=single("model.norm.weight"), lm_head=single(head, np.transpose))


def _check_shapes(params: ModelParams, cfg: ModelConfig):
  want = jax.tree_util.tree_flatten_with_path(param_specs(cfg),
                                              is_leaf=lambda s: hasattr(s, "axes"))[0]
  got = jax.tree.leaves(params)
  for (path, spec), arr in zip(want, got):
    if tuple(arr.shape) != spec.shape:
      raise CheckpointError(f"weight {jax.tree_util.keystr(path)} has shape {tuple(arr.shape)}; "
                            f"config.json implies {spec.shape}")


def load_hf_checkpoint(path: str, *, max_seq_len: int | None = None, dtype: str = "float32",
                       expert_kernel: str = "auto", shardings=None
                       ) -> tuple[ModelConfig, ModelParams]:
  """Loads a Hugging Face MoE checkpoint directory, straight onto its devices.

  Each weight is read tensor by tensor into the regions its sharding puts on each device and
  cast there to `dtype`: host memory holds one weight's shard at a time, never the model. A
  region replicated on several devices is read once; a tensor split inside (e.g. heads over a
  cell's devices) is read by each device holding a part (the page cache serves the repeats).

  Args:
    path: directory with config.json and model.safetensors (or a sharded index).
    max_seq_len: KV-cache capacity per request; default min(max_position_embeddings, 2048).
    dtype: "float32" or "bfloat16" for the loaded parameters (and the model's activations).
    expert_kernel: see ModelConfig.expert_kernel.
    shardings: None (the default device), one `jax.sharding.Sharding` for every weight, or a
      ModelParams-shaped tree of shardings (e.g. from `logical_axes` and a mesh).
  Returns:
    (config, params) with params as jax arrays on `shardings`.
  Raises:
    CheckpointError: unsupported architecture, missing file or tensor, or a shape mismatch
      (found from the files' headers, before any weight is read).
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
  weights = params_from_hf(_Tensors(path), cfg)
  _check_shapes(weights, cfg)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, weights)
  dt = jnp.dtype(dtype)

  def load(w: _Weight, sharding) -> jax.Array:
    regions = {}  # a region replicated on several devices is read once

    def region(index):
      key = tuple((s.start, s.stop, s.step) for s in index)
      if key not in regions:
        regions[key] = w.read(index).astype(dt)
      return regions[key]

    return jax.make_array_from_callback(w.shape, sharding, region)

  return cfg, jax.tree.map(load, weights, shardings)


def load_hf_part(path: str, cfg: ModelConfig, contents=None) -> ModelParams | ExpertParams:
  """One worker's part of the Hugging Face checkpoint at `path` (of `cfg`'s architecture), as
  host arrays in `cfg.dtype`, reading only the tensors it needs: every weight but the routed
  experts (`contents` None; the experts are None), or the experts of slots `contents`
  (i32[L, S], the logical expert in each slot of each layer, -1: an empty slot, zeros),
  [L, S, ...].

  Raises:
    CheckpointError: a missing file or tensor, or a shape that does not fit `cfg`.
  """
  weights = params_from_hf(_Tensors(path), cfg)
  _check_shapes(weights, cfg)
  dt = jnp.dtype(cfg.dtype)
  if contents is None:
    return jax.tree.map(lambda w: w.read().astype(dt), without_experts(weights))
  layers, idx, held = slot_index(contents)

  def read(w: _Weight) -> np.ndarray:
    a = _Weight(w.tensors, w.names[layers, idx], w.fn).read().astype(dt)
    a[~held] = 0
    return a

  e = weights.layers.moe.experts
  return ExpertParams(read(e.w_gate), read(e.w_up), read(e.w_down))
