"""Fault injection: which worker fails, how, and when.

A `Fault` names a worker ("aw1", "ew0", "store") or a node of a Ray cluster ("node1": every
worker on it at once, and its spare devices with them), a kind (`kill`: fail-stop, its arrays are
deleted; `hang`: it goes silent; `restart`: a failed store comes back) and a trigger: an engine
iteration and layer, a time since the engine started, and/or a condition (`flush`: while the
snapshot store has a durable flush in flight; `recovery`: while another recovery is still in
progress). All triggers given must hold. Faults are checked at every layer boundary.

The launcher flag syntax (`parse_faults`) is `kind:worker@key=value,...` joined by `;`, e.g.
`kill:ew1@step=6,layer=1; hang:aw0@t=2.5; kill:aw2@when=recovery`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Iterable

KINDS = ("kill", "hang", "restart")
CONDITIONS = ("flush", "recovery")
_WORKER = re.compile(r"^(aw|ew|node)\d+$|^store$")
# parse_faults' keys: key -> (Fault field, converter, what a valid value is)
_KEYS = {
    "step": ("step", int, "an int iteration >= 0"),
    "layer": ("layer", int, "an int layer boundary >= 0"),
    "t": ("time_s", float, "a number of seconds >= 0"),
    "when": ("when", str, f"one of {CONDITIONS}"),
    "lost_device": ("lost_device", int, "an int device index (-1 = none)"),
}


@dataclasses.dataclass(frozen=True)
class Fault:
  worker: str  # "aw<i>", "ew<i>", "store" or "node<i>"
  kind: str = "kill"
  step: int | None = None  # engine iteration (0-based) at or after which it fires
  layer: int = 0  # layer boundary within that iteration
  time_s: float | None = None  # seconds since the engine started
  when: str | None = None  # "flush" | "recovery"
  lost_device: int = 0  # which device of the worker's cell is lost for good; -1 = none

  def __post_init__(self):
    if not isinstance(self.worker, str) or not _WORKER.match(self.worker):
      raise ValueError(f"Fault: worker={self.worker!r}; use 'aw<i>', 'ew<i>', 'store' or "
                       "'node<i>'")
    if self.kind not in KINDS:
      raise ValueError(f"Fault: kind={self.kind!r}; use one of {KINDS}")
    if self.worker.startswith("node") and self.kind != "kill":
      raise ValueError(f"Fault: a node can only be killed, not {self.kind!r}")
    if self.kind == "restart" and self.worker != "store":
      raise ValueError(f"Fault: only the store can be restarted by a fault, not {self.worker}")
    if self.when is not None and self.when not in CONDITIONS:
      raise ValueError(f"Fault: when={self.when!r}; use one of {CONDITIONS}")
    for name, lo, optional in (("step", 0, True), ("layer", 0, False), ("lost_device", -1, False)):
      value = getattr(self, name)
      if value is None and optional:
        continue
      if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < lo:
        raise ValueError(f"Fault on {self.worker}: {name}={value!r} must be an int >= {lo}"
                         + (" (-1 = no device lost)" if name == "lost_device" else ""))
    if self.time_s is not None and (isinstance(self.time_s, bool)
                                    or not isinstance(self.time_s, numbers.Real)
                                    or not 0 <= self.time_s < math.inf):
      raise ValueError(f"Fault on {self.worker}: time_s={self.time_s!r} must be a finite number "
                       "of seconds >= 0")
    if self.step is None and self.time_s is None and self.when is None:
      raise ValueError(f"Fault on {self.worker}: give step=, t= or when= (when should it fire?)")

  @property
  def spec(self) -> str:
    """The fault in `parse_faults` syntax, e.g. 'kill:ew1@step=6,layer=1'."""
    keys = [f"step={self.step}" if self.step is not None else "",
            f"layer={self.layer}" if self.layer else "",
            f"t={self.time_s}" if self.time_s is not None else "",
            f"when={self.when}" if self.when is not None else "",
            f"lost_device={self.lost_device}" if self.lost_device else ""]
    return f"{self.kind}:{self.worker}@{','.join(k for k in keys if k)}"

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
  """Parses `kind:worker@key=value,...;...` (keys: step, layer, t, when, lost_device).

  Raises:
    ValueError: naming the fault and, for a bad key or value, the key and the value.
  """
  faults = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    m = re.fullmatch(r"(\w+):(\w+)(?:@(.*))?", part)
    if not m:
      raise ValueError(f"fault {part!r}: expected kind:worker@key=value,... "
                       f"(e.g. 'kill:ew1@step=6,layer=1')")
    kwargs: dict = {}
    for item in filter(None, (i.strip() for i in (m.group(3) or "").split(","))):
      key, _, value = (x.strip() for x in item.partition("="))
      if key not in _KEYS:
        raise ValueError(f"fault {part!r}: unknown key {key!r}; use {', '.join(_KEYS)}")
      name, convert, valid = _KEYS[key]
      if name in kwargs:
        raise ValueError(f"fault {part!r}: {key}= is given twice")
      try:
        kwargs[name] = convert(value)
      except ValueError:
        raise ValueError(f"fault {part!r}: {key}={value!r} is not {valid}") from None
    try:
      faults.append(Fault(m.group(2), m.group(1), **kwargs))
    except ValueError as e:  # Fault's own message, without its "Fault on <worker>: " prefix
      raise ValueError(f"fault {part!r}: " + re.sub(r"^Fault( on \w+)?: ", "", str(e))) from None
  return tuple(faults)


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}" + ("" if n == 1 else "s")


def check_schedule(faults: Iterable[Fault], *, num_aw: int, num_ew: int, num_layers: int,
                   aw_cell_size: int, ew_cell_size: int, num_nodes: int = 0) -> None:
  """Refuses a schedule that names something the engine does not have.

  A `Fault` on its own cannot know the cluster's shape; this checks each fault against it, so
  that a typo (`kill:aw9` on 3 AWs) is refused when the schedule is armed instead of being
  ignored, or failing, mid-run.

  Args:
    faults: the schedule (iterated once).
    num_aw, num_ew: how many attention / expert workers the engine has.
    num_layers: the model's layers (a fault's `layer` is a boundary in [0, num_layers)).
    aw_cell_size, ew_cell_size: devices in each AW's / EW's cell (`lost_device` indexes them).
    num_nodes: the nodes of the runtime's cluster (0: it has none to lose).
  Raises:
    ValueError: naming the first bad fault, its bad field, and what the engine has.
  """
  counts = {"aw": num_aw, "ew": num_ew}
  cells = {"aw": aw_cell_size, "ew": ew_cell_size}
  for fault in faults:
    if fault.worker == "store":
      continue
    if fault.worker.startswith("node"):
      if int(fault.worker[4:]) >= num_nodes:
        raise ValueError(f"fault {fault.spec!r}: no {fault.worker}; the runtime has "
                         + (f"{_count(num_nodes, 'node')} (node0..node{num_nodes - 1})"
                            if num_nodes else "no nodes (node faults need runtime='ray')"))
      continue
    kind, index = fault.worker[:2], int(fault.worker[2:])
    n = counts[kind]
    if index >= n:
      have = {0: "none", 1: f"{kind}0"}.get(n, f"{kind}0..{kind}{n - 1}")
      raise ValueError(f"fault {fault.spec!r}: no worker {fault.worker}; the engine has "
                       f"{_count(n, kind.upper())} ({have})")
    if fault.layer >= num_layers:
      raise ValueError(f"fault {fault.spec!r}: layer={fault.layer} but the model has "
                       f"{_count(num_layers, 'layer')} (layer= is 0..{num_layers - 1})")
    if fault.lost_device >= cells[kind]:
      raise ValueError(f"fault {fault.spec!r}: lost_device={fault.lost_device} but an "
                       f"{kind.upper()}'s cell has {_count(cells[kind], 'device')} "
                       f"(lost_device= is 0..{cells[kind] - 1}, or -1 for none)")


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
