"""The snapshot store as its own process: a proxy with `SnapshotStore`'s interface.

The store process (`tarragon_jax.runtime.host`, kind "store") runs the same `SnapshotStore`
as the local runtime. KV logs are cast to it (sent without a reply, never blocking the decode
path: a store that stopped draining makes the send fail, which the engine treats like a full
queue); `mark` is a request that the store answers once it has applied everything sent before
it, so a restore reads only committed state. Faults are signals to the process. Liveness is
the process's exit status (certain: the store is this process's child) and the probe
connection's heartbeat: the store is probed at most once per probe interval. A store whose
thread dies ends its process (`host.py`), so that it is seen as gone, not as silent. The
process has a data-plane inbox (`address`): AWs send their KV there directly, and `log_step`
then only names the step, its rows and the sender (`host.DirectStore`).
"""

from __future__ import annotations

import queue
import signal
import time

import zmq

from tarragon_jax.config import ModelConfig
from tarragon_jax.resilience.detector import DetectionConfig
from tarragon_jax.runtime.channel import Bound, Connection, Pending, RemoteError
from tarragon_jax.worker.fault_domain import FaultDomain, WorkerDead


class RemoteStore(FaultDomain):
  """A snapshot store process; `child` is its (started) process handle.

  Every wait is bounded (`DetectionConfig.deadline_s` for a call, `probe_interval_s` for
  `flushing`) and ends at once when the process is gone: `committed` and `restore_point` then
  raise `WorkerDead`, `bytes_in` answers the last value the store gave and `flushing` False.
  """

  def __init__(self, child, cfg: ModelConfig, directory: str, options: dict,
               detection: DetectionConfig, name: str = "store"):
    """`options`: `SnapshotStore`'s keyword arguments (`ResilienceConfig.store_options`).

    Raises:
      SpawnError: the process exited before it was ready, or was not ready within its start
        bound.
    """
    self.child, self.name, self.detection = child, name, detection
    probe = detection.probe_interval_s
    self._deadline = Bound(detection.deadline_s, "DetectionConfig.deadline_s")
    address, probe_address = child.ready()
    self.conn = Connection(address, probe_address, heartbeat_s=probe / 2,
                           heartbeat_timeout_s=3 * probe)
    # Not waited for: later requests queue behind it, and a failed init fails the first call.
    self._init = self._request({"op": "init", "spec": dict(
        kind="store", config=cfg.to_dict(), directory=directory, options=options,
        kv_wait_s=detection.deadline_s)})
    self._alive_at = time.perf_counter()
    self._stopped, self._bytes_in, self._address = False, None, None

  def _gone(self) -> str | None:
    """None while the process may still answer, else why it never will."""
    why = self.child.gone()
    if why is None and self.conn.disconnected():
      why = "its connection closed and its port refuses"
    return why

  def _request(self, message, bound: Bound | None = None) -> Pending:
    return Pending(self.conn, self.conn.send(message), message.get("method", message["op"]),
                   self.name, bound or self._deadline, self._gone,
                   slice_s=self.detection.probe_interval_s)

  def _ask(self, message, bound: Bound | None = None):
    """A request's result.

    Raises:
      WorkerDead: the store is gone (at once), or did not answer within the bound.
    """
    try:
      return self._request(message, bound).result()
    except TimeoutError as err:
      raise WorkerDead(str(err)) from err

  def _cast(self, method: str, *args):
    why = self.child.gone()  # a cheap check (a child's exit status) on every send
    if why is not None:
      raise WorkerDead(f"{self.name} is gone ({why})")
    try:
      self.conn.send({"op": "cast", "method": method, "args": args}, block=False)
    except zmq.Again as err:
      raise queue.Full(f"{self.name} is not draining its queue") from err

  # -- AW side: sent, never waited for --------------------------------------------------------

  def log_step(self, aw: int, seq: int, rows, kv):
    """`kv`: the step's KV, or {"from": the AW's data-plane address} if the AW sent it to
    `address` itself."""
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
    """True once the process is known to be gone (it exited, or its connection dropped and its
    port refuses)."""
    return self._gone() is not None

  def mark(self) -> Pending:
    """A reply that arrives once the store has applied everything sent so far."""
    return self._request({"op": "mark"})

  def caught_up(self, mark: Pending) -> bool:
    if mark.arrived():
      self._check_init()
      self._bytes_in = mark.result()  # the store's bytes_in as of the mark
      return True
    return False

  def _check_init(self):
    if self._init is not None:
      try:
        self._address = self._init.result(0.0)["address"]
      except RemoteError as err:
        raise RemoteError(f"{self.name} failed to start: {err}") from err
      self._init = None

  @property
  def address(self) -> str | None:
    """The store's data-plane inbox, where AWs send their KV directly; None until the store
    has started (until then the KV goes through the control plane, in `log_step`)."""
    if self._init is not None and self._init.arrived():
      try:
        self._check_init()
      except RemoteError:
        return None  # (the next `mark` raises it)
    return self._address

  @property
  def flushing(self) -> bool:
    """Whether a durable-tier write is in flight (False if the store is gone or does not
    answer within a probe interval)."""
    if self._gone() is not None:
      return False
    try:
      return bool(self._ask({"op": "attr", "name": "flushing"}, Bound(
          self.detection.probe_interval_s, "DetectionConfig.probe_interval_s")))
    except WorkerDead:
      return False

  @property
  def bytes_in(self) -> int | None:
    """KV bytes the store has logged: asked if the store runs and answers within the deadline,
    else the last value it gave (None if it never said); at once if it is gone or stopped."""
    if not self._stopped and self._gone() is None:
      self._read_bytes_in()
    return self._bytes_in

  def _read_bytes_in(self):
    try:
      self._bytes_in = self._ask({"op": "attr", "name": "bytes_in"})
    except (WorkerDead, RemoteError):
      pass  # the last value stands

  def committed(self, rid: int) -> int:
    return self._ask({"op": "call", "method": "committed", "args": [rid]})

  def restore_point(self, rid: int):
    out = self._ask({"op": "call", "method": "restore_point", "args": [rid]})
    return None if out is None else tuple(out)

  # -- faults are signals ---------------------------------------------------------------------

  def kill(self):
    """SIGKILL. Health is left to detection (the probe connection drops at once)."""
    self.child.signal(signal.SIGKILL)

  def hang(self):
    self.child.signal(signal.SIGSTOP)

  def stop(self):
    """Ends the process (after reading its counters, if it is connected and answers)."""
    if self._stopped:
      return
    if self._gone() is None and self.conn.probe(0.0):
      self._read_bytes_in()
    self._stopped = True
    self.child.stop()
    self.conn.close()
