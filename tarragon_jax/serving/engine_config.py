"""Configuration of the engine: cluster shape, batching and resilience. Frozen and validated."""

from __future__ import annotations

import dataclasses

from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience.detector import DetectionConfig
from tarragon_jax.resilience.kv_archive import CHUNK
from tarragon_jax.resilience.recovery import policy_class


@dataclasses.dataclass(frozen=True)
class ResilienceConfig:
  """How failures are detected and repaired."""

  # The recovery policy: "tarragon", "global_restart" (the MegaScale-like baseline), or
  # "package.module:ClassName" for a `RecoveryPolicy` of your own (README, "Recovery policies").
  recovery: str = "tarragon"
  snapshots: bool = True  # AWs log KV to the snapshot store (per-request restore)
  detection: DetectionConfig = DetectionConfig()
  replace_failed: bool = True  # failed AWs/EWs get a replacement on spare devices
  replace_store: bool = True  # a failed store is restarted at once (else: `restart:store` fault)
  flush_interval_s: float = 0.2  # the store's durable tier is written this often
  durable_chunk: int = CHUNK  # positions per durable chunk file (the tier lags < one chunk)
  store_dir: str | None = None  # durable snapshot tier; a temporary directory if None
  weights_dir: str | None = None  # orbax checkpoint for replacements/restarts; saved if None
  # Bounds on the waits outside the exchange (the exchange's are the detector's). Each also
  # ends at once when the peer's process is gone. Defaults are ~10x what a tiny model takes on
  # a loaded 2-core host, so that only a stuck worker reaches them.
  start_timeout_s: float = 60.0  # a worker process: exec to READY (Python + JAX import)
  build_timeout_s: float = 300.0  # a replacement: start, weights, compile, until it can join
  warm_up_timeout_s: float = 600.0  # `Engine.warm_up`: every shape on every worker
  close_timeout_s: float = 30.0  # `Engine.close`: background builds and the store stop

  def __post_init__(self):
    policy_class(self.recovery)  # an unknown policy is refused here, naming what would do
    if not self.flush_interval_s > 0:
      raise ValueError(f"ResilienceConfig: flush_interval_s={self.flush_interval_s} must be > 0")
    for name in ("start_timeout_s", "build_timeout_s", "warm_up_timeout_s", "close_timeout_s"):
      if not getattr(self, name) > 0:
        raise ValueError(f"ResilienceConfig: {name}={getattr(self, name)} must be > 0")
    if not self.durable_chunk >= 1:
      raise ValueError(f"ResilienceConfig: durable_chunk={self.durable_chunk} must be >= 1")

  @property
  def store_options(self) -> dict:
    """Keyword arguments of `SnapshotStore` (a store process gets them as they are)."""
    return dict(flush_interval_s=self.flush_interval_s, durable_chunk=self.durable_chunk)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Cluster shape and batching. See README for what each field does."""

  plan: CellPlan = CellPlan()
  slots_per_aw: int = 8  # concurrent requests per AW (KV-cache slots)
  shadows_per_expert: int = 1
  ew_slots_per_layer: int | None = None  # expert slots per EW per layer (budget); None = fit
  min_prefill_bucket: int = 16  # prompts are padded to a power of two >= this
  resilience: ResilienceConfig = ResilienceConfig()

  def __post_init__(self):
    if self.slots_per_aw < 1:
      raise ValueError(f"EngineConfig: slots_per_aw={self.slots_per_aw} must be >= 1")
    if self.min_prefill_bucket < 1:
      raise ValueError(f"EngineConfig: min_prefill_bucket={self.min_prefill_bucket} must be >= 1")
