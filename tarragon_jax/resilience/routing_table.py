"""The expert routing table (ERT): logical expert -> physical slots, with an epoch.

An immutable value: every update returns a new table with a higher epoch. The datapath reads
only `active` (the slot each expert is served from now) as an array input, so rerouting
compiles nothing.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from tarragon_jax.worker.placement import Placement, _frozen


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingTable:
  replicas: np.ndarray  # i32[L, E, R] physical slots, the serving one first, -1 = none
  slots_per_layer: int  # S: physical slot p lives on EW p // S, local slot p % S
  epoch: int = 0

  def __post_init__(self):
    # Everything downstream unpacks [L, E, R] and does slot arithmetic in ints: a 2-D table would
    # fail far from here, and a float one would route to truncated slots.
    a = self.replicas
    frozen = (isinstance(a, np.ndarray) and a.dtype == np.int32 and not a.flags.writeable
              and a.base is None)  # `_frozen`'s: read-only, and no writeable array under it
    if not frozen:
      try:
        a = np.asarray(a)
      except ValueError as e:  # ragged nested lists
        raise ValueError(f"RoutingTable: replicas are not an [L, E, R] array ({e}); give every "
                         "expert the same number of slots, padded with -1") from None
    if a.ndim != 3 or 0 in a.shape:
      raise ValueError(f"RoutingTable: replicas have shape {a.shape}; give i32[L, E, R] (layers, "
                       "experts, an expert's slots with the serving one first), each >= 1: "
                       "e.g. slots[..., None] for one slot per expert")
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"RoutingTable: replicas have dtype {a.dtype}; slot ids must be integers "
                       "(-1 = none): cast them, e.g. replicas.astype(np.int32)")
    if a.min() < -1:
      l, e, k = (int(i) for i in np.argwhere(a < -1)[0])
      raise ValueError(f"RoutingTable: replicas[{l}, {e}, {k}]={int(a[l, e, k])}; a slot id is "
                       ">= 0, or -1 for none")
    if a.max() > np.iinfo(np.int32).max:
      raise ValueError(f"RoutingTable: replicas hold slot id {a.max()}, which does not fit in "
                       "int32")
    for name, lo in (("slots_per_layer", 1), ("epoch", 0)):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
        raise ValueError(f"RoutingTable: {name}={value!r} must be an int >= {lo}")
    if not frozen:  # a read-only copy: the table stays a value whatever the caller does to `a`
      object.__setattr__(self, "replicas", _frozen(a))

  @classmethod
  def from_placement(cls, placement: Placement) -> RoutingTable:
    return cls(placement.replicas, placement.slots_per_layer, 0)

  @property
  def active(self) -> np.ndarray:
    """i32[L, E]: the physical slot serving each expert (-1 = unreachable)."""
    return self.replicas[..., 0]

  def device_array(self, device=None) -> jnp.ndarray:
    return jnp.asarray(self.active, device=device)

  def reroute(self, layer: int, expert: int, slot: int) -> RoutingTable:
    """Serves (layer, expert) from `slot`, which must already hold one of its replicas."""
    row = [int(p) for p in self.replicas[layer, expert]]
    if slot not in row or slot < 0:
      raise ValueError(f"RoutingTable.reroute: slot {slot} holds no replica of expert {expert} "
                       f"in layer {layer}; its replicas are {[p for p in row if p >= 0]}")
    order = [slot] + [p for p in row if p != slot]
    replicas = self.replicas.copy()
    replicas[layer, expert] = order
    return dataclasses.replace(self, replicas=_frozen(replicas), epoch=self.epoch + 1)

  def without_ew(self, ew: int) -> RoutingTable:
    """Drops every slot on `ew`; each affected expert fails over to its next replica."""
    S = self.slots_per_layer
    num_ew = (int(self.replicas.max()) // S + 1) if self.replicas.max() >= 0 else 0
    if not 0 <= ew < num_ew:
      raise ValueError(f"RoutingTable.without_ew: ew={ew} holds no slot; EWs are 0..{num_ew - 1}")
    replicas = self.replicas.copy()
    L, E, R = replicas.shape
    for l in range(L):
      for e in range(E):
        live = [p for p in replicas[l, e] if p >= 0 and p // S != ew]
        replicas[l, e] = live + [-1] * (R - len(live))
    return dataclasses.replace(self, replicas=_frozen(replicas), epoch=self.epoch + 1)

  def check_fits(self, placement: Placement, failed_ews=()):
    """Checks that this table fits `placement` and routes no expert to an EW in `failed_ews`.

    Raises:
      ValueError: it does not (the first offending entry named, with what would be valid).
    """
    p = placement
    if self.slots_per_layer != p.slots_per_layer or self.replicas.shape[:2] != (
        p.num_layers, p.num_experts):
      raise ValueError(
          f"routing table (slots_per_layer={self.slots_per_layer}, [L, E] = "
          f"{list(self.replicas.shape[:2])}) does not match the engine's placement "
          f"(slots_per_layer={p.slots_per_layer}, [L, E] = [{p.num_layers}, {p.num_experts}])")
    S = p.slots_per_layer
    for (l, e), slot in np.ndenumerate(self.active):
      if slot < 0:
        continue
      ew, local = divmod(int(slot), S)
      held = p.contents[l, ew, local] if ew < p.num_ew else -1
      if held != e:
        raise ValueError(f"routing table sends layer {l} expert {e} to slot {slot} (EW {ew}), "
                         f"which holds expert {held}")
      if ew in failed_ews:
        raise ValueError(f"routing table sends layer {l} expert {e} to slot {slot} on EW {ew}, "
                         f"which was declared failed (failed EWs: {sorted(failed_ews)}); "
                         "route it to a replica on a live EW")

  def unreachable(self) -> list[tuple[int, int]]:
    """(layer, expert) pairs with no live replica."""
    return [tuple(map(int, le)) for le in np.argwhere(self.active < 0)]

  def slots_in_use(self, num_ew: int) -> list[int]:
    """Per EW: 1 + the highest local slot any expert is served from (0: the EW serves none)."""
    used = [0] * num_ew
    for p in self.active.ravel():
      if p >= 0:
        ew, local = divmod(int(p), self.slots_per_layer)
        used[ew] = max(used[ew], local + 1)
    return used

  def computed_slots(self, base: RoutingTable, num_ew: int) -> list[int]:
    """Per EW, how many of its leading slots an expert call computes under this table.

    `place` puts each EW's primaries first and its shadows after them. While the table routes
    no expert beyond the slots that `base` (the placement's table) serves from, an EW computes
    only those: its idle shadows cost nothing (computing them would slow every fault-free
    step). Once a shadow serves, the EW computes every slot. Two sizes per EW, so that both
    are compiled up front and a failover compiles nothing.
    """
    now = self.slots_in_use(num_ew)
    return [max(1, b) if n <= b else self.slots_per_layer
            for n, b in zip(now, base.slots_in_use(num_ew))]

  def ews_serving(self) -> set[int]:
    return {int(p) // self.slots_per_layer for p in self.active.ravel() if p >= 0}
