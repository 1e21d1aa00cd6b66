"""The snapshot store as its own process: a proxy with `SnapshotStore`'s interface.

The store process (`tarragon_jax.runtime.host`, kind "store") runs the same `SnapshotStore`
as the local runtime. KV logs are cast to it (sent without a reply, never blocking the decode
path: a store that stopped draining makes the send fail, which the engine treats like a full
queue); `mark` is a request that the store answers once it has applied everything sent before
it, so a restore reads only committed state. Faults are signals to the process. Liveness is
the probe connection's heartbeat: the store is probed at most once per probe interval.
"""

from __future__ import annotations

import queue
import signal
import time

import zmq

from tarragon_jax.config import ModelConfig
from tarragon_jax.resilience.detector import DetectionConfig
from tarragon_jax.resilience.fault_domain import FaultDomain, WorkerDead
from tarragon_jax.runtime.channel import Connection, Pending, RemoteError


class RemoteStore(FaultDomain):
  """A snapshot store process; `child` is its (started) process handle."""

  def __init__(self, child, cfg: ModelConfig, directory: str, options: dict,
               detection: DetectionConfig, name: str = "store"):
    """`options`: `SnapshotStore`'s keyword arguments (`ResilienceConfig.store_options`)."""
    self.child, self.name, self.detection = child, name, detection
    probe = detection.probe_interval_s
    address, probe_address = child.ready()
    self.conn = Connection(address, probe_address, heartbeat_s=probe / 2,
                           heartbeat_timeout_s=3 * probe)
    # Not waited for: later requests queue behind it, and a failed init fails the first call.
    self._init = self._request({"op": "init", "spec": dict(
        kind="store", config=cfg.to_dict(), directory=directory, options=options)})
    self._alive_at = time.perf_counter()
    self._stopped, self._bytes_in = False, None

  def _request(self, message) -> Pending:
    return Pending(self.conn, self.conn.send(message), message.get("method", message["op"]))

  def _ask(self, message, timeout_s: float):
    """A request's result; WorkerDead if the store does not answer within `timeout_s`."""
    try:
      return self._request(message).result(timeout_s)
    except TimeoutError as err:
      raise WorkerDead(f"{self.name}: {err}") from err

  def _cast(self, method: str, *args):
    try:
      self.conn.send({"op": "cast", "method": method, "args": args}, block=False)
    except zmq.Again as err:
      raise queue.Full(f"{self.name} is not draining its queue") from err

  # -- AW side: sent, never waited for --------------------------------------------------------

  def log_step(self, aw: int, seq: int, rows, kv):
    self._cast("log_step", aw, seq, rows, kv)

  def base(self, aw: int, rows, k, v):
    self._cast("base", aw, rows, k, v)

  def forget(self, rid: int):
    self._cast("forget", rid)

  # -- orchestrator side ----------------------------------------------------------------------

  def lag_s(self) -> float:
    """Time since the store last proved alive (the watchdog probes once this reaches the
    probe interval)."""
    return time.perf_counter() - self._alive_at

  def probe(self) -> bool:
    ok = self.conn.probe(self.detection.probe_interval_s)
    if ok:
      self._alive_at = time.perf_counter()
    return ok

  def disconnected(self) -> bool:
    return self.conn.disconnected()

  def mark(self) -> Pending:
    """A reply that arrives once the store has applied everything sent so far."""
    return self._request({"op": "mark"})

  def caught_up(self, mark: Pending) -> bool:
    if mark.arrived():
      self._check_init()
      return True
    return False

  def _check_init(self):
    if self._init is not None:
      try:
        self._init.result(0.0)
      except RemoteError as err:
        raise RemoteError(f"{self.name} failed to start: {err}") from err
      self._init = None

  @property
  def flushing(self) -> bool:
    """Whether a durable-tier write is in flight (False if the store does not answer at once)."""
    try:
      return bool(self._ask({"op": "attr", "name": "flushing"},
                            self.detection.probe_interval_s))
    except WorkerDead:
      return False

  @property
  def bytes_in(self) -> int | None:
    """KV bytes the store has logged (as of `stop` once stopped; None if it never said)."""
    if self._stopped:
      return self._bytes_in
    return self._ask({"op": "attr", "name": "bytes_in"}, self.detection.deadline_s)

  def committed(self, rid: int) -> int:
    return self._ask({"op": "call", "method": "committed", "args": [rid]},
                     self.detection.deadline_s)

  def restore_point(self, rid: int):
    out = self._ask({"op": "call", "method": "restore_point", "args": [rid]},
                    self.detection.deadline_s)
    return None if out is None else tuple(out)

  # -- faults are signals ---------------------------------------------------------------------

  def kill(self):
    """SIGKILL. Health is left to detection (the probe connection drops at once)."""
    self.child.signal(signal.SIGKILL)

  def hang(self):
    self.child.signal(signal.SIGSTOP)

  def stop(self):
    """Ends the process (after reading its counters, if it answers)."""
    if self._stopped:
      return
    if self.conn.probe(0.0):
      try:
        self._bytes_in = self.bytes_in
      except WorkerDead:
        pass
    self._stopped = True
    self.child.stop()
    self.conn.close()
