"""Fault injection: which worker fails, how, and when.

A `Fault` names a worker ("aw1", "ew0", "store"), a kind (`kill`: fail-stop, its arrays are
deleted; `hang`: it goes silent; `restart`: a failed store comes back) and a trigger: an engine
iteration and layer, a time since the engine started, and/or a condition (`flush`: while the
snapshot store has a durable flush in flight; `recovery`: while another recovery is still in
progress). All triggers given must hold. Faults are checked at every layer boundary.

The launcher flag syntax (`parse_faults`) is `kind:worker@key=value,...` joined by `;`, e.g.
`kill:ew1@step=6,layer=1; hang:aw0@t=2.5; kill:aw2@when=recovery`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

KINDS = ("kill", "hang", "restart")
CONDITIONS = ("flush", "recovery")
_WORKER = re.compile(r"^(aw|ew)\d+$|^store$")


@dataclasses.dataclass(frozen=True)
class Fault:
  worker: str  # "aw<i>", "ew<i>" or "store"
  kind: str = "kill"
  step: int | None = None  # engine iteration (0-based) at or after which it fires
  layer: int = 0  # layer boundary within that iteration
  time_s: float | None = None  # seconds since the engine started
  when: str | None = None  # "flush" | "recovery"
  lost_device: int = 0  # which device of the worker's cell is lost for good; -1 = none

  def __post_init__(self):
    if not _WORKER.match(self.worker):
      raise ValueError(f"Fault: worker={self.worker!r}; use 'aw<i>', 'ew<i>' or 'store'")
    if self.kind not in KINDS:
      raise ValueError(f"Fault: kind={self.kind!r}; use one of {KINDS}")
    if self.kind == "restart" and self.worker != "store":
      raise ValueError(f"Fault: only the store can be restarted by a fault, not {self.worker}")
    if self.when is not None and self.when not in CONDITIONS:
      raise ValueError(f"Fault: when={self.when!r}; use one of {CONDITIONS}")
    if self.step is not None and self.step < 0:
      raise ValueError(f"Fault: step={self.step} must be >= 0")
    if self.layer < 0:
      raise ValueError(f"Fault: layer={self.layer} must be >= 0")
    if self.step is None and self.time_s is None and self.when is None:
      raise ValueError(f"Fault on {self.worker}: give step=, t= or when= (when should it fire?)")

  def due(self, step: int, layer: int, elapsed_s: float, flushing: Callable[[], bool],
          recovering: bool) -> bool:
    """Whether the fault fires now; `flushing` is asked only for a `when=flush` fault."""
    if self.step is not None and (step, layer) < (self.step, self.layer):
      return False
    if self.time_s is not None and elapsed_s < self.time_s:
      return False
    if self.when == "flush" and not flushing():
      return False
    if self.when == "recovery" and not recovering:
      return False
    return True


def parse_faults(spec: str) -> tuple[Fault, ...]:
  """Parses `kind:worker@key=value,...;...` (keys: step, layer, t, when, lost_device)."""
  faults = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    m = re.fullmatch(r"(\w+):(\w+)(?:@(.*))?", part)
    if not m:
      raise ValueError(f"fault {part!r}: expected kind:worker@key=value,... "
                       f"(e.g. 'kill:ew1@step=6,layer=1')")
    kwargs: dict = {}
    for item in filter(None, (i.strip() for i in (m.group(3) or "").split(","))):
      key, _, value = item.partition("=")
      if key in ("step", "layer", "lost_device"):
        kwargs[key] = int(value)
      elif key == "t":
        kwargs["time_s"] = float(value)
      elif key == "when":
        kwargs["when"] = value
      else:
        raise ValueError(f"fault {part!r}: unknown key {key!r}; use step, layer, t, when, "
                         f"lost_device")
    faults.append(Fault(m.group(2), m.group(1), **kwargs))
  return tuple(faults)


class FaultInjector:
  """Holds a schedule and hands out the faults that are due, each once."""

  def __init__(self, faults=()):
    self.pending = list(faults)
    self.fired: list[tuple[Fault, float]] = []

  def due(self, step: int, layer: int, elapsed_s: float, flushing: Callable[[], bool],
          recovering: bool, now: float) -> list[Fault]:
    out = [f for f in self.pending if f.due(step, layer, elapsed_s, flushing, recovering)]
    for f in out:
      self.pending.remove(f)
      self.fired.append((f, now))
    return out
