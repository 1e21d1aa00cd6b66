"""Where a worker that is (re)built loads the weights it serves: the user's own checkpoint.

A weights directory is either an orbax checkpoint (`save_checkpoint`) or a Hugging Face one
(config.json + safetensors). Either way the weights must be those the engine serves: a
checkpoint of another model with the same shapes would load without an error and serve wrong
tokens. An orbax checkpoint carries its fingerprint, checked before anything is read; a Hugging
Face checkpoint carries none, so its config is checked up front and its weights' fingerprint
once they are loaded, before a worker serves them.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

import tarragon_jax.checkpoint_parts as checkpoint_parts
from tarragon_jax.checkpoint import (
  check_fingerprint,
  expert_fingerprints,
  load_checkpoint,
  part_fingerprints,
  weights_fingerprint,
)
from tarragon_jax.config import ModelConfig
from tarragon_jax.hf_import import CheckpointError, config_from_hf, load_hf_checkpoint, load_hf_part
from tarragon_jax.layers.params import ExpertParams, ModelParams

# ModelConfig fields that are execution choices, not the weights' architecture.
_EXECUTION = ("expert_kernel", "capacity_factor")


def is_hf_checkpoint(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "config.json")) and any(
      os.path.exists(os.path.join(directory, f))
      for f in ("model.safetensors", "model.safetensors.index.json"))


def _architecture(cfg: ModelConfig) -> dict:
  return {k: v for k, v in cfg.to_dict().items() if k not in _EXECUTION}


def check_weights_dir(directory: str, cfg: ModelConfig, fingerprint: str):
  """Raises ValueError unless `directory` is a checkpoint of the weights served (`cfg`,
  `fingerprint`): for Hugging Face, of the same architecture (its weights are checked on load)."""
  if not is_hf_checkpoint(directory):
    check_fingerprint(directory, fingerprint)
    return
  with open(os.path.join(directory, "config.json")) as f:
    try:
      hf = config_from_hf(json.load(f), max_seq_len=cfg.max_seq_len, dtype=cfg.dtype)
    except (KeyError, json.JSONDecodeError, CheckpointError) as e:
      raise ValueError(f"{directory}: not a usable Hugging Face checkpoint ({e!r})") from e
  if _architecture(hf) != _architecture(cfg):
    diff = ", ".join(f"{k}={v!r}, served {getattr(cfg, k)!r}"
                     for k, v in _architecture(hf).items() if getattr(cfg, k) != v)
    raise ValueError(f"{directory}: the Hugging Face checkpoint is of another model than the one "
                     f"served ({diff})")


def expected_weights(directory: str | None, cfg: ModelConfig,
                     params: ModelParams) -> tuple[str, dict | None]:
  """What workers that load weights from `directory` check them against: the fingerprint of
  `params`, and for a Hugging Face checkpoint (which stores none) that of each part a worker
  may load alone (`part_fingerprints`).

  Raises:
    ValueError: `directory` is not a checkpoint of `params` (`check_weights_dir`).
  """
  fingerprint = weights_fingerprint(params, cfg)
  if not directory:
    return fingerprint, None
  check_weights_dir(directory, cfg, fingerprint)
  return fingerprint, part_fingerprints(params, cfg) if is_hf_checkpoint(directory) else None


def load_weights(directory: str, cfg: ModelConfig, shardings=None,
                 expect: str | None = None) -> ModelParams:
  """The weights in `directory`, in `cfg.dtype`, onto `shardings` (see `load_checkpoint`).

  Raises:
    ValueError: `expect` is given and the weights have another fingerprint.
  """
  if not is_hf_checkpoint(directory):
    return load_checkpoint(directory, shardings=shardings, expect=expect)[1]
  _, params = load_hf_checkpoint(directory, max_seq_len=cfg.max_seq_len, dtype=cfg.dtype,
                                 expert_kernel=cfg.expert_kernel, shardings=shardings)
  if expect is not None:
    found = weights_fingerprint(params, cfg)
    if found != expect:
      jax.tree.map(lambda a: a.delete(), params)
      raise ValueError(f"{directory}: the checkpoint holds other weights than expected "
                       f"(fingerprint {found}, expected {expect}); give the checkpoint the "
                       f"served weights came from")
  return params


def load_worker_weights(directory: str, cfg: ModelConfig, contents=None,
                        expect: str | None = None,
                        expect_parts: dict | None = None) -> ModelParams | ExpertParams:
  """The part of the weights in `directory` that one worker serves: an AW's (`contents` None:
  every weight but the routed experts, which are None) or an EW's (`contents`, i32[L, S]: its
  expert slots, [L, S, ...]).

  Only that part is read, as host arrays. An orbax checkpoint's stored fingerprint must be
  `expect` (checked first, `checkpoint_parts`); a Hugging Face checkpoint stores none, so the
  part read is checked against `expect_parts` (`part_fingerprints` of the weights served).

  Raises:
    ValueError: the weights are not those expected, or `expect` is given for a Hugging Face
      checkpoint without `expect_parts` (its part could not be checked).
  """
  if not is_hf_checkpoint(directory):
    if contents is None:
      return checkpoint_parts.load_attention(directory, expect=expect)
    return checkpoint_parts.load_experts(directory, contents, expect=expect)
  if expect_parts is None:
    if expect is not None:
      raise ValueError(f"{directory}: a worker's part of a Hugging Face checkpoint is checked "
                       f"against the fingerprints of the parts (`part_fingerprints`), not the "
                       f"model's: give expect_parts")
    return load_hf_part(directory, cfg, contents)
  part = load_hf_part(directory, cfg, contents)
  if contents is None:
    differ = ["the weights outside the routed experts"] * (
        weights_fingerprint(part, cfg) != expect_parts["attention"])
  else:  # each held slot's expert against that expert's own fingerprint
    found = expert_fingerprints(part)
    differ = [f"expert {e} of layer {layer}"
              for (layer, s), e in np.ndenumerate(np.asarray(contents))
              if e >= 0 and found[layer][s] != expect_parts["experts"][layer][e]]
  if differ:
    raise ValueError(f"{directory}: the checkpoint holds other weights than expected "
                     f"({', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''} differ from "
                     f"those served); give the checkpoint the served weights came from")
  return part
