"""Replacement workers, built off the serving thread on spare devices.

A build takes spare devices for one cell, copies the worker's weights from live peers (the
engine's weights_dir as the fallback; a worker process loads its own from weights_dir), builds
the worker and compiles its executables unless the cell is a hot spare. It runs in a thread so
that serving goes on; the finished worker joins only when the recovery policy says (`Join`, at a
layer boundary). A build past its `build_timeout_s` is abandoned: its devices stay out of the
pool (the thread may still be using them) and its worker, if it ever appears, is stopped.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import numpy as np

from tarragon_jax.layers.params import ExpertParams
from tarragon_jax.mesh.cells import Cell
from tarragon_jax.weights_source import load_worker_weights
from tarragon_jax.worker.fault_domain import FaultDomain


@dataclasses.dataclass
class Build:
  kind: str  # "aw" | "ew"
  index: int
  cell: Cell
  started: float
  worker: FaultDomain | None = None
  error: str | None = None
  done: float | None = None
  source: str = ""  # where the weights came from: "peer" or "checkpoint"
  thread: threading.Thread | None = None
  abandoned: bool = False  # past its bound or the engine closed: its worker is not wanted


class Replacements:
  """The builds in flight for one engine (`engine`: its state, runtime and worker factory)."""

  def __init__(self, engine):
    self.e = engine
    self.builds: list[Build] = []
    self._generation = 0

  def start(self, kind: str, index: int) -> Build | None:
    """Starts building a replacement for (`kind`, `index`); None if no device is spare."""
    e, state = self.e, self.e.state
    size = state.plan.devices_per_ew if kind == "ew" else state.plan.devices_per_aw
    if not state.spares:  # (fewer than `size` devices left: a smaller cell serves)
      e.timeline.add("no_spare", worker=f"{kind}{index}")
      return None
    devices = tuple(state.spares[:size])
    del state.spares[:len(devices)]
    self._generation += 1
    build = Build(kind, index, Cell(f"{kind}{index}.r{self._generation}", devices),
                  time.perf_counter())
    self.builds.append(build)
    e.timeline.add("replacement_started", worker=f"{kind}{index}",
                   devices=[getattr(d, "id", d) for d in devices])
    build.thread = threading.Thread(target=self._build, args=(build,), daemon=True)
    build.thread.start()
    return build

  def coming(self, kind: str) -> bool:
    return any(b.kind == kind for b in self.builds)

  def finished(self) -> list[Build]:
    """Removes and returns the builds that are done (with a worker or an error); a build past
    its `build_timeout_s` is abandoned and returned with an error."""
    bound = self.e.engine_cfg.resilience.build_timeout_s
    now = time.perf_counter()
    out = []
    for b in list(self.builds):
      if b.done is None and now - b.started > bound:
        b.abandoned = True
        b.error = f"not built within build_timeout_s={bound}"
      elif b.done is None:
        continue
      self.builds.remove(b)
      if b.error is not None and b.worker is not None:
        b.worker.kill()
      if b.error is not None and not b.abandoned:
        self.e.state.spares.extend(b.cell.devices)
      out.append(b)
    return out

  def wait(self, timeout_s: float | None = None):
    """Blocks until every build has finished, each at most its `build_timeout_s` (or
    `timeout_s` for all)."""
    for b in list(self.builds):
      bound = b.started + self.e.engine_cfg.resilience.build_timeout_s
      if timeout_s is not None:
        bound = min(bound, time.perf_counter() + timeout_s)
      b.thread.join(max(0.0, bound - time.perf_counter()))

  def close(self, timeout_s: float):
    """Waits up to `timeout_s` for every build together; one still running is abandoned."""
    deadline = time.perf_counter() + timeout_s
    for b in list(self.builds):
      b.abandoned = True
      b.thread.join(max(0.0, deadline - time.perf_counter()))
      if b.worker is not None:
        b.worker.kill()
    self.builds = []

  def _peer_weights(self, kind: str, index: int):
    """The replacement's weights copied from live peers, or None if no peer holds them all.

    An AW's weights are every AW's; an EW's slots are gathered, slot by slot, from an EW that
    holds a replica of the same expert (a shadow or a primary).
    """
    e, state = self.e, self.e.state
    if kind == "aw":
      alive = [a for a in state.live_aws() if a != index]
      return state.aws[alive[0]].params if alive else None
    p, S = state.placement, state.placement.slots_per_layer
    peers: dict[int, ExpertParams] = {}
    parts = {name: np.zeros((p.num_layers, S) + getattr(state.ews[0].weights, name).shape[2:],
                            e.cfg.dtype) for name in ("w_gate", "w_up", "w_down")}
    for l in range(p.num_layers):
      for s in range(S):
        expert = p.contents[l, index, s]
        if expert < 0:
          continue
        sources = [int(q) for q in state.base_table.replicas[l, expert] if q >= 0
                   and q // S != index and q // S not in state.failed_ews]
        if not sources:
          return None
        m, local = divmod(sources[0], S)
        if m not in peers:
          peers[m] = jax.tree.map(np.asarray, state.ews[m].weights)  # device -> host, once
        for name in parts:
          parts[name][l, s] = getattr(peers[m], name)[l, local]
    return ExpertParams(**parts)

  def _build(self, b: Build):
    """Runs off the serving thread: weights from peers (else weights_dir), worker on its cell."""
    e = self.e
    try:
      params, b.source = None, "checkpoint"
      if not e.runtime.remote:  # (a new process loads its weights itself, from weights_dir)
        try:
          params, b.source = self._peer_weights(b.kind, b.index), "peer"
        except Exception:  # noqa: BLE001 - a peer failed while being copied: use orbax
          params = None
        if params is None:
          if e.weights_dir is None:
            raise RuntimeError(f"no live peer holds the weights of {b.kind}{b.index} and the "
                               f"engine has no checkpoint to load them from: give "
                               f"ResilienceConfig.weights_dir")
          contents = None if b.kind == "aw" else e.state.placement.contents[:, b.index]
          params = load_worker_weights(  # (its part only)
              e.weights_dir, e.cfg, contents, expect=e.weights_fingerprint,
              expect_parts=e.part_fingerprints)
          b.source = "checkpoint"
      w = e.make_worker(b.kind, b.index, b.cell, params)
      b.worker = w
      if (b.kind, b.cell.devices) not in e.hot_cells:  # a hot spare has compiled already
        e.warm_worker(w)
    except Exception as err:  # noqa: BLE001 - reported in the timeline, serving goes on
      b.error = repr(err)
    if b.abandoned and b.worker is not None:
      b.worker.kill()
    b.done = time.perf_counter()
