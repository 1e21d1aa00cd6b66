"""Model configuration: one frozen, validated dataclass that every layer function reads."""

from __future__ import annotations

import dataclasses
from typing import Literal

FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
EXPERT_KERNELS = ("auto", "ragged", "capacity", "loop")

Family = Literal["mixtral", "qwen3_moe", "qwen2_moe"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of an MoE decoder, plus the expert-kernel choice.

  Frozen and hashable, so it is a valid static argument of `jax.jit`. `__post_init__` rejects
  inconsistent values with a message that says what to change.
  """

  family: Family = "mixtral"
  vocab_size: int = 256
  hidden_size: int = 64  # D
  num_layers: int = 2  # L
  num_heads: int = 4  # N
  num_kv_heads: int = 2  # K
  head_dim: int = 16  # H
  num_experts: int = 8  # E
  top_k: int = 2  # X
  expert_hidden: int = 128  # F
  shared_expert_hidden: int = 0  # Qwen2-MoE shared expert width; 0 = no shared expert
  norm_topk_prob: bool = True  # renormalize the top-k router weights to sum to 1
  qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
  attention_bias: bool = False  # bias on the q/k/v projections (Qwen2)
  rms_eps: float = 1e-5
  rope_theta: float = 10_000.0
  max_seq_len: int = 256  # capacity of one KV-cache slot, in tokens
  sliding_window: int | None = None  # attend to at most this many most recent keys
  tie_embeddings: bool = False
  dtype: str = "float32"  # parameter and activation dtype
  # Execution choice, not architecture: which expert kernel `experts.expert_ffn` uses.
  expert_kernel: str = "auto"
  capacity_factor: float = 2.0  # sort-and-pad kernel: slots per expert = factor * tokens * k / E

  def __post_init__(self):
    def need(cond: bool, msg: str):
      if not cond:
        raise ValueError(f"ModelConfig: {msg}")

    need(self.family in FAMILIES, f"family={self.family!r}; valid families are {FAMILIES}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "num_experts", "top_k", "expert_hidden", "max_seq_len"):
      value = getattr(self, name)
      need(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive int")
    need(self.num_heads % self.num_kv_heads == 0,
         f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    need(self.top_k <= self.num_experts,
         f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
    need(self.shared_expert_hidden >= 0,
         f"shared_expert_hidden={self.shared_expert_hidden} must be >= 0 (0 = none)")
    need(self.rms_eps > 0, f"rms_eps={self.rms_eps} must be > 0")
    need(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be > 0")
    need(self.sliding_window is None or self.sliding_window > 0,
         f"sliding_window={self.sliding_window} must be None or > 0")
    need(self.dtype in ("float32", "bfloat16"),
         f"dtype={self.dtype!r}; valid dtypes are 'float32', 'bfloat16'")
    need(self.expert_kernel in EXPERT_KERNELS,
         f"expert_kernel={self.expert_kernel!r}; valid kernels are {EXPERT_KERNELS}")
    need(self.capacity_factor > 0, f"capacity_factor={self.capacity_factor} must be > 0")

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"ModelConfig: unknown fields {unknown}; valid fields are {sorted(known)}")
    return cls(**d)
