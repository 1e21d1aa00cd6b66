"""Point-to-point channels between independent processes, built on ZeroMQ.

An `Endpoint` is a worker's inbox: a ROUTER socket for requests, and a second socket that
nobody reads, for probes. A `Connection` is one client's link to one endpoint: requests carry
an id and wait with a deadline (`result` returns None when the reply is late: the caller
decides whether to probe; a `Pending` holds one reply to come, with a bound and a liveness
check of its peer: a wait on a peer that is gone ends at once), and `probe` reports whether the
peer answers ZeroMQ's own heartbeats (ZMTP PING/PONG) on the probe connection. Heartbeats are
answered by libzmq's I/O thread, not by Python, so a worker that is busy compiling (holding the
GIL) still answers, while a stopped (SIGSTOP) or killed (SIGKILL) one does not: the probe
connection is dropped after `heartbeat_timeout_s` (at once for a kill) and probes fail until it
is back. The request connection has no heartbeat timeout: dropping it would lose the replies in
flight.

Why ZeroMQ (`experiments/bench_transport.py`, 2-core machine, loopback TCP, JAX in both
processes): a probe round trip takes 0.1-0.26 ms and a 128 KiB array round trip 0.7-0.9 ms
(a multiprocessing pipe: 0.43 ms, but one host only and no reconnect); a stopped or killed
peer fails a 10 ms probe in 10.2 ms; it reconnects by itself when a replacement binds the same
address, and it works across hosts unchanged. Per-layer AW<->EW data could later move to
`jax.experimental.transfer` on GPU hosts (no host staging).
"""

from __future__ import annotations

import dataclasses
import itertools
import socket
import time
from collections.abc import Callable

import zmq
import zmq.utils.monitor

from tarragon_jax.runtime import wire
from tarragon_jax.worker.fault_domain import WorkerDead


def _bind(sock: zmq.Socket, host: str, port: int) -> str:
  if port:
    sock.bind(f"tcp://{host}:{port}")
  else:
    port = sock.bind_to_random_port(f"tcp://{host}")
  return f"tcp://{host}:{port}"


class Request:
  """A received request: reply to it with `Endpoint.reply`."""

  def __init__(self, client: bytes, rid: bytes, message):
    self.client, self.rid, self.message = client, rid, message


class Endpoint:
  """A worker's inbox."""

  def __init__(self, host: str = "127.0.0.1", port: int = 0, probe_port: int = 0):
    self._ctx = zmq.Context.instance()
    self._sock = self._ctx.socket(zmq.ROUTER)
    self._sock.setsockopt(zmq.LINGER, 0)
    self.address = _bind(self._sock, host, port)
    self._probe = self._ctx.socket(zmq.ROUTER)  # only heartbeats: libzmq answers them
    self._probe.setsockopt(zmq.LINGER, 0)
    self.probe_address = _bind(self._probe, host, probe_port)

  def recv(self, timeout_s: float | None = None) -> Request | None:
    """The next request, or None if none arrives within `timeout_s` (None: wait forever)."""
    if not self._sock.poll(None if timeout_s is None else int(timeout_s * 1000)):
      return None
    client, rid, *frames = self._sock.recv_multipart(copy=False)
    return Request(client.bytes, rid.bytes, wire.decode(frames))

  def reply(self, request: Request, message):
    self._sock.send_multipart([request.client, request.rid, *wire.encode(message)], copy=False)

  def close(self):
    self._sock.close()
    self._probe.close()


class Connection:
  """One client's link to one endpoint, with heartbeats every `heartbeat_s`."""

  def __init__(self, address: str, probe_address: str, heartbeat_s: float = 0.005,
               heartbeat_timeout_s: float = 0.03):
    self._ctx = zmq.Context.instance()
    self._sock = self._ctx.socket(zmq.DEALER)
    self._sock.setsockopt(zmq.LINGER, 0)
    self._sock.connect(address)
    self._probe = self._ctx.socket(zmq.DEALER)
    self._probe.setsockopt(zmq.LINGER, 0)
    self._probe.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(heartbeat_s * 1000)))
    self._probe.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(heartbeat_timeout_s * 1000)))
    self._probe.setsockopt(zmq.RECONNECT_IVL, max(1, int(heartbeat_s * 1000)))
    # Up = the ZMTP handshake succeeded (the peer's libzmq answered; a stopped process's
    # kernel still accepts TCP connections, so a TCP connect alone proves nothing).
    self._monitor = self._probe.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED
                                                   | zmq.EVENT_DISCONNECTED)
    self._connected = self._was_up = self._refused = False
    self._port_checked = 0.0
    host, _, port = probe_address.removeprefix("tcp://").rpartition(":")
    self._probe_host_port = (host, int(port))
    self._probe.connect(probe_address)
    self._ids = itertools.count(1)
    self._replies: dict[int, object] = {}
    self._ignored: set[int] = set()

  def send(self, message, block: bool = True) -> int:
    """Sends a request without waiting for its reply; returns its id for `result`.

    Raises:
      zmq.Again: `block` is False and the message cannot be queued (the peer is gone or stopped
        and its queue is full).
    """
    rid = next(self._ids)
    self._sock.send_multipart([rid.to_bytes(8, "little"), *wire.encode(message)], copy=False,
                              flags=0 if block else zmq.NOBLOCK)
    return rid

  def result(self, rid: int, timeout_s: float):
    """The reply to request `rid`, or None if it has not arrived within `timeout_s`."""
    deadline = time.perf_counter() + timeout_s
    while rid not in self._replies:
      left_ms = max(0, int((deadline - time.perf_counter()) * 1000))
      if not self._sock.poll(left_ms):
        return None
      got, *frames = self._sock.recv_multipart(copy=False)
      got = int.from_bytes(got.bytes, "little")
      if got in self._ignored:
        self._ignored.discard(got)
      else:
        self._replies[got] = wire.decode(frames)
    return self._replies.pop(rid)

  def ignore(self, rid: int):
    """The reply to `rid` will not be asked for: drop it when it arrives."""
    if self._replies.pop(rid, None) is None:
      self._ignored.add(rid)

  def call(self, message, timeout_s: float):
    """Sends a request and waits for its reply; None if it is late."""
    return self.result(self.send(message), timeout_s)

  def disconnected(self) -> bool:
    """True if the peer's process is gone: the probe connection was up, has dropped, and its
    port refuses a new TCP connection (a stopped or merely slow process's kernel still accepts
    one). Checks the port at most once per millisecond; never waits longer than a connect."""
    self.probe(0.0)
    if not self._was_up or self._connected:
      return False
    now = time.perf_counter()
    if now - self._port_checked < 1e-3:
      return self._refused
    self._port_checked = now
    try:
      socket.create_connection(self._probe_host_port, timeout=0.05).close()
      self._refused = False
    except ConnectionRefusedError:
      self._refused = True
    except OSError:  # unreachable or timed out: not proof of death; the probes decide
      self._refused = False
    return self._refused

  def probe(self, timeout_s: float) -> bool:
    """True if the peer's connection is up (it answers heartbeats), waiting `timeout_s` for
    it to come up."""
    deadline = time.perf_counter() + timeout_s
    while True:
      while self._monitor.poll(0):
        event = zmq.utils.monitor.recv_monitor_message(self._monitor)["event"]
        self._connected = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
        self._was_up |= self._connected
      left = deadline - time.perf_counter()
      if self._connected or left <= 0:
        return self._connected
      self._monitor.poll(max(1, int(left * 1000)))

  def close(self):
    """Closes both sockets (again: nothing)."""
    if self._sock.closed:
      return
    self._probe.disable_monitor()
    self._monitor.close()
    self._probe.close()
    self._sock.close()


class RemoteError(RuntimeError):
  """A worker process failed to serve a call (its traceback is the message)."""


@dataclasses.dataclass(frozen=True)
class Bound:
  """How long a wait may last, and the setting a user changes to change it (named in the
  error when the wait passes it)."""

  seconds: float
  setting: str  # e.g. "ResilienceConfig.warm_up_timeout_s"

  def __post_init__(self):
    if not self.seconds >= 0:
      raise ValueError(f"Bound: seconds={self.seconds} for {self.setting} must be >= 0")


def connection_lost(conn: Connection) -> Callable[[], str | None]:
  """A liveness check for a peer known only by its connection: why it is gone, or None."""
  return lambda: "its connection closed and its port refuses" if conn.disconnected() else None


class Pending:
  """The reply to one request from `peer`, read when it has arrived.

  `result` waits at most `bound` (unless told another), in slices of `slice_s`; between
  slices it asks `gone`, the peer's liveness check (None while the peer may still answer, else
  why it never will), so that a wait on a dead peer ends at once instead of at its bound.
  """

  def __init__(self, conn: Connection, rid: int, method: str, peer: str, bound: Bound,
               gone: Callable[[], str | None], slice_s: float = 0.01,
               on_reply: Callable[[object], None] | None = None):
    self._conn, self._rid, self.method = conn, rid, method
    self.peer, self.bound, self._gone, self._slice_s = peer, bound, gone, slice_s
    self._on_reply = on_reply  # called once with the reply (e.g. to count its bytes)
    self._reply = None

  def _got(self, reply):
    if reply is not None and self._on_reply is not None:
      self._on_reply(reply)
    return reply

  def arrived(self) -> bool:
    if self._reply is None:
      self._reply = self._got(self._conn.result(self._rid, 0.0))
    return self._reply is not None

  def result(self, timeout_s: float | None = None, what: str | None = None,
             setting: str | None = None):
    """The call's result.

    Args:
      timeout_s: the longest wait (None: this reply's own `bound`).
      what: the operation, for errors (default "<peer>.<method>").
      setting: the setting that `timeout_s` comes from, for errors.

    Raises:
      WorkerDead: the peer is gone (its process exited, its connection closed); at once, not
        at the bound.
      TimeoutError: no reply within the bound from a peer that is not known to be gone (a
        stopped or stuck process); names the peer, the operation and the bound.
      RemoteError: the call failed in the peer.
    """
    if self._reply is None:
      bound = self.bound if timeout_s is None else Bound(
          timeout_s, setting or f"the timeout_s given for {self.method}")
      self._reply = self._got(self._wait(bound, what or f"{self.peer}.{self.method}"))
    if "error" in self._reply:
      raise RemoteError(f"{self.method} failed in {self.peer}'s process:\n{self._reply['error']}")
    return self._reply.get("result")

  def _wait(self, bound: Bound, what: str):
    deadline = time.perf_counter() + bound.seconds
    while True:
      left = deadline - time.perf_counter()
      reply = self._conn.result(self._rid, max(0.0, min(self._slice_s, left)))
      if reply is not None:
        return reply
      why = self._gone()
      if why is not None:
        reply = self._conn.result(self._rid, 0.0)  # it may have answered just before it died
        if reply is not None:
          return reply
        raise WorkerDead(f"{what}: {self.peer} is gone ({why}); no reply will come")
      if left <= 0:
        raise TimeoutError(f"{what}: no reply from {self.peer} within {bound.seconds:g} s "
                           f"(set by {bound.setting}); its process is alive but silent "
                           f"(stopped or stuck)")

  def ignore(self):
    if self._reply is None:
      self._conn.ignore(self._rid)

  @staticmethod
  def wait_any(pendings: list[Pending], timeout_s: float):
    """Blocks until a reply may have arrived on any of `pendings`' connections, or for
    `timeout_s` (a `Detector.wait` block)."""
    waiting = {id(p._conn._sock): p._conn._sock for p in pendings if p._reply is None}
    if not waiting:
      return
    poller = zmq.Poller()
    for sock in waiting.values():
      poller.register(sock, zmq.POLLIN)
    poller.poll(max(1, int(timeout_s * 1000)))
