"""Orbax checkpoints of model parameters and their config.

A checkpoint directory is an orbax `CheckpointManager` directory: each step holds the params
(`StandardSave`), the ModelConfig as JSON and a metadata JSON with the weights' fingerprint, so
`load_checkpoint` needs nothing but the path. The fingerprint (`weights_fingerprint`: a digest of
the config and of a sample of every parameter) lets a loader check that a checkpoint holds the
weights it expects: another model's weights of the same shapes load without any error and serve
wrong tokens, so a worker rebuilt from a checkpoint compares fingerprints first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.params import ExpertParams, ModelParams, abstract_params, without_experts

MIN_CHUNK_BYTES = 1 << 20  # orbax's smallest recommended chunk (it warns below)
SAMPLES = 1 << 16  # elements of each weight that its fingerprint reads
EXPERT_SAMPLES = 1 << 12  # elements of each expert matrix that the expert's fingerprint reads
_ON_DEVICE = 1 << 24  # elements from which a weight is sampled where it lives


def _sample(leaf) -> np.ndarray:
  """`SAMPLES` evenly spaced elements of a weight. A large device array is sampled on its
  devices, so only the samples reach the host; a small one is read whole (no compile)."""
  n = int(np.prod(leaf.shape))
  idx = np.linspace(0, n - 1, min(n, SAMPLES)).astype(np.int64)
  if isinstance(leaf, jax.Array) and n >= _ON_DEVICE:
    return np.asarray(_gather(leaf, idx))
  return np.asarray(leaf).reshape(-1)[idx]


@jax.jit
def _gather(a, idx):
  return a.reshape(-1)[idx]


def weights_fingerprint(params: ModelParams, config: ModelConfig) -> str:
  """A digest of the config and of every weight: its path, shape, dtype and `SAMPLES` evenly
  spaced elements.

  It tells apart another model's weights (another training or seed differs everywhere), which
  is what a worker rebuilt from a checkpoint must refuse; it is not a checksum of every byte
  (a file damaged in a few elements is orbax's and the filesystem's to detect). Sampling keeps
  it cheap at any size: a model of tens of GB is never copied to the host to be hashed.
  """
  digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    a = np.ascontiguousarray(_sample(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{a.dtype}".encode())
    digest.update(a.view(np.uint8).reshape(-1) if a.size else b"")
  return "sha256:" + digest.hexdigest()


def _expert_samples(w) -> np.ndarray:
  """`EXPERT_SAMPLES` evenly spaced elements of each expert matrix of w [L, E, ...]: [L, E, n],
  taken where w lives."""
  n = math.prod(w.shape[2:])
  idx = np.linspace(0, n - 1, min(n, EXPERT_SAMPLES)).astype(np.int64)
  if isinstance(w, jax.Array):
    return np.asarray(_gather_experts(w, idx))
  return np.asarray(w).reshape(w.shape[:2] + (n,))[:, :, idx]


@jax.jit
def _gather_experts(w, idx):
  return w.reshape(w.shape[:2] + (-1,))[:, :, idx]


def expert_fingerprints(experts: ExpertParams) -> list[list[str]]:
  """A digest of each expert (or EW slot) of `experts` [L, E, ...], [L][E]: its three
  matrices' shapes, dtype and `EXPERT_SAMPLES` evenly spaced elements each."""
  ws = (experts.w_gate, experts.w_up, experts.w_down)
  samples = [np.ascontiguousarray(_expert_samples(w)) for w in ws]

  def digest(layer: int, e: int) -> str:
    d = hashlib.sha256()
    for w, s in zip(ws, samples):
      d.update(f"{tuple(w.shape[2:])}:{s.dtype}".encode())
      d.update(s[layer, e].view(np.uint8))
    return "sha256:" + d.hexdigest()

  L, E = samples[0].shape[:2]
  return [[digest(layer, e) for e in range(E)] for layer in range(L)]


def part_fingerprints(params: ModelParams, config: ModelConfig) -> dict:
  """What a worker that loads only its part of a checkpoint storing no fingerprint (a Hugging
  Face one) checks it against: {"attention": `weights_fingerprint` of every weight but the
  routed experts, "experts": each (layer, expert)'s `expert_fingerprints`, [L][E]}. Per expert,
  not per EW: it holds for any placement (a global restart may carve another)."""
  return {"attention": weights_fingerprint(without_experts(params), config),
          "experts": expert_fingerprints(params.layers.moe.experts)}


def save_checkpoint(directory: str, params: ModelParams, config: ModelConfig, step: int = 0,
                    metadata: dict | None = None) -> str:
  """Saves params, config and their fingerprint as `step` under `directory`; blocks until they
  are on disk.

  Returns:
    The path of the saved step.
  """
  directory = os.path.abspath(directory)
  metadata = dict(metadata or {}, fingerprint=weights_fingerprint(params, config))
  # Each (layer, expert) matrix a chunk of its own, so that an EW reads its experts and no
  # others (`checkpoint_parts`); experts under `MIN_CHUNK_BYTES` share chunks of about that
  # size. Other weights: orbax's default chunks.
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(), params)
  experts = jax.tree.map(
      lambda a: ocp.SaveArgs(chunk_byte_size=max(MIN_CHUNK_BYTES,
                                                 math.prod(a.shape[2:]) * a.dtype.itemsize),
                             shard_axes=(0, 1)), params.layers.moe.experts)
  save_args = dataclasses.replace(save_args, layers=dataclasses.replace(
      save_args.layers, moe=dataclasses.replace(save_args.layers.moe, experts=experts)))
  with ocp.CheckpointManager(directory) as mgr:
    mgr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params, save_args=save_args),
        config=ocp.args.JsonSave(config.to_dict()),
        metadata=ocp.args.JsonSave(metadata),
    ))
    mgr.wait_until_finished()
  return os.path.join(directory, str(step))


def _step(mgr: ocp.CheckpointManager, directory: str, step: int | None) -> int:
  step = mgr.latest_step() if step is None else step
  if step is None or step not in mgr.all_steps():
    raise FileNotFoundError(f"{directory}: no checkpoint step {step}; steps: {mgr.all_steps()}")
  return step


def latest_step(directory: str) -> int:
  """The newest step of a checkpoint directory.

  Raises:
    FileNotFoundError: it holds none.
  """
  with ocp.CheckpointManager(os.path.abspath(directory)) as mgr:
    return _step(mgr, directory, None)


def checkpoint_config(directory: str, step: int | None = None) -> ModelConfig:
  """The ModelConfig saved with a checkpoint step (the latest when None)."""
  with ocp.CheckpointManager(os.path.abspath(directory)) as mgr:
    step = _step(mgr, directory, step)
    meta = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ModelConfig.from_dict(dict(meta["config"]))


def checkpoint_fingerprint(directory: str, step: int | None = None) -> str | None:
  """The fingerprint stored with a checkpoint (None: saved without one)."""
  directory = os.path.abspath(directory)
  with ocp.CheckpointManager(directory) as mgr:
    step = _step(mgr, directory, step)
    meta = mgr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  return dict(meta["metadata"] or {}).get("fingerprint")


def check_fingerprint(directory: str, expect: str, step: int | None = None):
  """Raises ValueError unless the checkpoint's stored fingerprint is `expect`."""
  found = checkpoint_fingerprint(directory, step)
  if found != expect:
    raise ValueError(
        f"{directory}: the checkpoint holds other weights than expected (fingerprint "
        f"{found or 'none: saved without one'}, expected {expect}); give a checkpoint saved "
        f"from these params with `save_checkpoint` (or no weights_dir, and the engine saves one)")


def load_checkpoint(directory: str, step: int | None = None, shardings=None,
                    expect: str | None = None) -> tuple[ModelConfig, ModelParams]:
  """Restores (config, params) from a directory written by `save_checkpoint`.

  Args:
    directory: the checkpoint manager directory.
    step: which step; the latest when None.
    shardings: None (default device), one `jax.sharding.Sharding` for every weight, or a
      ModelParams-shaped tree of shardings; params are restored directly onto them.
    expect: the fingerprint (`weights_fingerprint`) the weights must have; checked before
      anything is restored.
  Raises:
    ValueError: `expect` is given and the checkpoint holds other weights.
  """
  directory = os.path.abspath(directory)
  if expect is not None:
    check_fingerprint(directory, expect, step)
  config = checkpoint_config(directory, step)
  with ocp.CheckpointManager(directory) as mgr:
    step = _step(mgr, directory, step)
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, abstract_params(config))
    target = abstract_params(config, shardings)
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            target)
    restored = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  return config, restored["params"]
