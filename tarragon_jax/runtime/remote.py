"""The process runtime: every AW and EW its own OS process, driven through proxies.

`ProcessRuntime` gives the engine cells that are process slots, starts a
`tarragon_jax.runtime.host` process per worker and hands back a `RemoteWorker` proxy with the
worker's interface. A proxy call sends a request and returns a `Pending` reply; the engine waits
for it inside the exchange, with the same detector as in the local runtime (a late reply is
silence; the peer's probe thread answers or not). Arrays travel between workers through the
driver as host arrays. A fault is a real signal: `kill` is SIGKILL, `hang` is SIGSTOP.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np

from tarragon_jax import launch_config
from tarragon_jax.mesh.cells import carve
from tarragon_jax.resilience.fault_domain import FaultDomain, Health
from tarragon_jax.runtime.channel import Connection


class RemoteError(RuntimeError):
  """A worker process failed to serve a call (its traceback is the message)."""


class Pending:
  """The reply to one request, read when it has arrived."""

  def __init__(self, conn: Connection, rid: int, method: str):
    self._conn, self._rid, self.method = conn, rid, method
    self._reply = None

  def arrived(self) -> bool:
    if self._reply is None:
      self._reply = self._conn.result(self._rid, 0.0)
    return self._reply is not None

  def result(self, timeout_s: float = 600.0):
    if self._reply is None:
      self._reply = self._conn.result(self._rid, timeout_s)
      if self._reply is None:
        raise TimeoutError(f"no reply to {self.method} within {timeout_s} s")
    if "error" in self._reply:
      raise RemoteError(f"{self.method} failed in the worker process:\n{self._reply['error']}")
    return self._reply.get("result")

  def ignore(self):
    if self._reply is None:
      self._conn.ignore(self._rid)


@dataclasses.dataclass(frozen=True)
class ProcessCell:
  """A worker's slot: one process (one device), named like a local cell."""

  name: str
  devices: tuple  # slot ids

  @property
  def size(self) -> int:
    return len(self.devices)

  def replicated(self):
    return None  # arrays reach a process as host arrays; there is no sharding to target


class HostTransfers:
  """The process runtime's `Transfers`: arrays are host arrays already; counts bytes."""

  def __init__(self):
    self.count = self.bytes = 0

  def send_many(self, items: list[tuple]):
    trees = [x for x, _ in items]
    for x in trees:
      for leaf in (x if isinstance(x, (tuple, list)) else (x,)):
        self.count += 1
        self.bytes += np.asarray(leaf).nbytes
    return trees


class RemoteWorker(FaultDomain):
  """A proxy for one worker process; methods return `Pending` replies."""

  def __init__(self, kind: str, index: int, cell: ProcessCell, cfg, probe_s: float,
               compile_cache: str):
    self.kind, self.index, self.cell, self.cfg = kind, index, cell, cfg
    self.name = f"{kind}{index}"
    self.probe_s = probe_s
    self.conn = None
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "tarragon_jax.runtime.host", f"--compile_cache={compile_cache}"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))

  def connect(self):
    """Waits for the process to bind its endpoint (Python and JAX start) and connects."""
    line = self.proc.stdout.readline().split()
    if not line or line[0] != "READY":
      raise RemoteError(f"{self.name}: the worker process did not start ({line})")
    # Heartbeats every half probe interval; three missed intervals drop the probe connection
    # (a worker starved of CPU on a busy host is not declared dead for one late PONG).
    self.conn = Connection(line[1], line[2], heartbeat_s=self.probe_s / 2,
                           heartbeat_timeout_s=3 * self.probe_s)

  def request(self, method: str, *args) -> Pending:
    return Pending(self.conn, self.conn.send({"op": "call", "method": method, "args": args}),
                   method)

  def init(self, spec: dict) -> Pending:
    """Has the process load its weights (orbax) and build its worker."""
    return Pending(self.conn, self.conn.send({"op": "init", "spec": spec}), "init")

  # -- the worker interface ---------------------------------------------------------------------

  def put(self, array):
    return np.asarray(array)

  def zeros(self, capacity: int):
    return np.zeros((capacity, self.cfg.hidden_size), self.cfg.dtype)

  def empty_buffer(self, capacity: int):
    return self.zeros(capacity), np.full((capacity,), -1, np.int32)


  # -- faults are signals ----------------------------------------------------------------------

  def probe(self) -> bool:
    return self.conn.probe(self.probe_s)

  def kill(self):
    """SIGKILL (fail-stop). Health stays unknown here: the driver learns it by detection."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
      self.proc.wait()
    self.health = Health.DEAD

  def hang(self):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGSTOP)
    self.health = Health.HUNG

  def close(self):
    if self.proc.poll() is None:
      if self.conn is not None:
        self.conn.call({"op": "exit"}, 5.0)
      self.proc.kill()
      self.proc.wait()
    if self.conn is not None:
      self.conn.close()


def _forward(method: str):
  def call(self, *args) -> Pending:
    return self.request(method, *args)
  call.__name__ = method
  call.__doc__ = f"`{method}` in the worker process (a Pending reply)."
  return call


for _method in ("begin", "attend", "replay", "combine", "sample", "restore", "cache_copy",
                "warm_up", "run_layer", "sync"):
  setattr(RemoteWorker, _method, _forward(_method))


class ProcessRuntime:
  """Workers as processes on this machine, one CPU device each, `slots` of them at most."""

  remote = True

  def __init__(self, slots: int = 8, compile_cache: str = launch_config.DEFAULT_COMPILE_CACHE):
    self.slots, self.compile_cache = slots, compile_cache
    self.workers: list[RemoteWorker] = []

  def devices(self) -> list:
    return list(range(self.slots))

  def carve(self, plan, devices):
    return carve(plan, devices, make_cell=ProcessCell)

  def transfers(self) -> HostTransfers:
    return HostTransfers()

  def start_worker(self, engine, kind: str, index: int, cell: ProcessCell) -> RemoteWorker:
    """Starts the process, then has it load its weights (orbax) and build its worker."""
    return self.start_workers(engine, [(kind, index, cell)])[0]

  def start_workers(self, engine, specs: list[tuple]) -> list[RemoteWorker]:
    """Starts (kind, index, cell) workers side by side: all processes, then all inits."""
    probe_s = engine.engine_cfg.resilience.detection.probe_interval_s
    workers = [RemoteWorker(kind, index, cell, engine.cfg, probe_s, self.compile_cache)
               for kind, index, cell in specs]
    self.workers += workers
    p = engine.placement
    for w in workers:
      w.connect()
    inits = [w.init(dict(kind=w.kind, index=w.index, config=engine.cfg.to_dict(),
                         weights_dir=engine.weights_dir, slots=engine.engine_cfg.slots_per_aw,
                         snapshots=engine.engine_cfg.resilience.snapshots, num_ew=p.num_ew,
                         slots_per_layer=p.slots_per_layer, contents=p.contents,
                         replicas=p.replicas)) for w in workers]
    for w, pending in zip(workers, inits):
      try:
        pending.result(600.0)
      except (RemoteError, TimeoutError) as err:
        raise RemoteError(f"{w.name}: init failed: {err}") from err
    return workers

  def close(self):
    for w in self.workers:
      w.close()
