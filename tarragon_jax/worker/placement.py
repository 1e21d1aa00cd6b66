"""Which expert worker holds which experts: primaries and shadow experts, within a budget.

Each EW has `slots_per_layer` expert slots for every MoE layer. A physical slot is numbered
`ew * slots_per_layer + local`. Primaries are spread evenly; shadows fill the remaining budget,
never on the EW of their primary (or of another replica), least-loaded EW first.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tarragon_jax.config import ModelConfig


def _frozen(a) -> np.ndarray:
  a = np.array(a, dtype=np.int32)
  a.setflags(write=False)
  return a


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
  num_ew: int
  slots_per_layer: int  # S
  contents: np.ndarray  # i32[L, M, S] logical expert in each EW slot, -1 = empty
  replicas: np.ndarray  # i32[L, E, R] physical slots of each expert, primary first, -1 = none

  @property
  def num_layers(self) -> int:
    return self.contents.shape[0]

  @property
  def num_experts(self) -> int:
    return self.replicas.shape[1]

  def ew_of(self, physical_slot: int) -> int:
    return int(physical_slot) // self.slots_per_layer

  def memory_report(self, cfg: ModelConfig) -> list[dict]:
    """Per-EW bytes taken by primaries and shadows, and the slot budget in bytes."""
    per_expert = 3 * cfg.hidden_size * cfg.expert_hidden * np.dtype(cfg.dtype).itemsize
    report = []
    for m in range(self.num_ew):
      prim = shad = 0
      for l in range(self.num_layers):
        for s in range(self.slots_per_layer):
          e = self.contents[l, m, s]
          if e < 0:
            continue
          if self.replicas[l, e, 0] == m * self.slots_per_layer + s:
            prim += 1
          else:
            shad += 1
      report.append(dict(ew=m, primaries=prim, shadows=shad, primary_bytes=prim * per_expert,
                         shadow_bytes=shad * per_expert,
                         budget_bytes=self.num_layers * self.slots_per_layer * per_expert))
    return report


def slots_for_budget(cfg: ModelConfig, budget_bytes: int) -> int:
  """How many expert slots per layer fit in an EW memory budget of `budget_bytes`."""
  per_expert = 3 * cfg.hidden_size * cfg.expert_hidden * np.dtype(cfg.dtype).itemsize
  return budget_bytes // (cfg.num_layers * per_expert)


def place(num_layers: int, num_experts: int, num_ew: int, slots_per_layer: int | None = None,
          shadows_per_expert: int = 1) -> Placement:
  """Places every expert's primary and up to `shadows_per_expert` shadows.

  Args:
    num_layers, num_experts: the model's MoE layers and logical experts per layer.
    num_ew: expert workers.
    slots_per_layer: expert slots per EW per layer (the memory budget); default fits every
      primary and the requested shadows.
    shadows_per_expert: shadows wanted per expert; fewer are placed when the budget or the
      number of EWs does not allow more.
  Raises:
    ValueError: the budget cannot hold every primary, or arguments are out of range.
  """
  if num_ew < 1 or num_experts < 1 or num_layers < 1:
    raise ValueError(f"place: num_ew={num_ew}, num_experts={num_experts}, num_layers={num_layers} "
                     "must all be >= 1")
  if shadows_per_expert < 0:
    raise ValueError(f"place: shadows_per_expert={shadows_per_expert} must be >= 0")
  need = math.ceil(num_experts / num_ew)
  if slots_per_layer is None:
    slots_per_layer = need + math.ceil(num_experts * min(shadows_per_expert, num_ew - 1) / num_ew)
  if slots_per_layer < need:
    raise ValueError(
        f"place: slots_per_layer={slots_per_layer} cannot hold the primaries: {num_experts} "
        f"experts over {num_ew} EWs need at least {need} slots per EW per layer")
  S = slots_per_layer
  R = 1 + shadows_per_expert
  contents = np.full((num_layers, num_ew, S), -1, np.int32)
  replicas = np.full((num_layers, num_experts, R), -1, np.int32)
  for l in range(num_layers):
    used = np.zeros(num_ew, np.int32)
    for e in range(num_experts):  # primaries: round-robin, rotated per layer to spread load
      m = (e + l) % num_ew
      contents[l, m, used[m]] = e
      replicas[l, e, 0] = m * S + used[m]
      used[m] += 1
    for r in range(1, R):
      for e in range(num_experts):
        holders = {int(p) // S for p in replicas[l, e] if p >= 0}
        home = int(replicas[l, e, 0]) // S
        candidates = [m for m in range(num_ew) if m not in holders and used[m] < S]
        if not candidates:
          continue
        m = min(candidates, key=lambda m: (used[m], (m - home) % num_ew))
        contents[l, m, used[m]] = e
        replicas[l, e, r] = m * S + used[m]
        used[m] += 1
  return Placement(num_ew, S, _frozen(contents), _frozen(replicas))
