"""`ZmqPlane`: the data plane of the process runtime, host arrays over ZeroMQ, peer to peer.

Each worker process binds one ROUTER socket (its inbox; its address goes to the control plane
in the reply to `init`) and holds one DEALER socket per peer. Sends never block: a message to
a peer whose link is still connecting waits in a bounded queue, and one that finds the queue
full is dropped (its receiver stops waiting when the sender is gone or declared). Messages
travel in the wire format of `runtime/wire.py` (a JSON header, the array as its own frame, no
copy on receipt).
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import zmq

from tarragon_jax.runtime import wire
from tarragon_jax.runtime.channel import _bind
from tarragon_jax.worker.dataplane import Tag

SEND_QUEUE = 256  # messages queued per peer before sends to it are dropped
GONE_CHECK_S = 0.005  # while a message is waited for, how often its sender's process is checked
_WONT_COME = object()  # the control plane said that this message will not come


class Incoming:
  """A message whose data is still on its way (e.g. a pull under way in another thread): `take`
  waits on `done` for it, as it would for a message to arrive."""

  def __init__(self):
    self.done = threading.Event()
    self.value = None
    self.error: str | None = None


class ZmqPlane:
  """A worker process's data plane (see `worker/dataplane.py` for the interface)."""

  def __init__(self, host: str = "127.0.0.1"):
    self._ctx = zmq.Context.instance()
    self._inbox_sock = self._ctx.socket(zmq.ROUTER)
    self._inbox_sock.setsockopt(zmq.LINGER, 0)
    self.address = _bind(self._inbox_sock, host, 0)
    self._links: dict[str, tuple[str, zmq.Socket]] = {}  # name -> (address, socket)
    self.inbox: dict[Tag, np.ndarray] = {}
    self.bytes_sent = self.sent = self.dropped = 0
    self.abandoned = 0  # pulls given up on (`Incoming`: a transport that pulls)
    self.missed = None  # why the last `take` returned None

  def connect(self, peers: dict):
    """Links to peers: {name: address}; a name linked to another address is relinked (its
    replacement), and the old link closed."""
    for name, address in peers.items():
      old = self._links.get(name)
      if old is not None and old[0] == address:
        continue
      if old is not None:
        old[1].close()
      sock = self._ctx.socket(zmq.DEALER)
      sock.setsockopt(zmq.LINGER, 0)
      # Messages wait for a link that is still connecting (a peer just linked), up to a
      # bound: to a dead peer only a few are ever sent before it is declared and relinked.
      sock.setsockopt(zmq.SNDHWM, SEND_QUEUE)
      sock.connect(address)
      self._links[name] = (address, sock)

  def send(self, items: list[tuple[str, Tag, object]]):
    """Sends (peer, tag, array) messages; each is fetched to the host first. A message that
    cannot be queued (its peer's queue is full) is dropped. An array
    None says that the message with this tag will not come."""
    for peer, tag, x in items:
      link = self._links.get(peer)
      if link is None:
        self.dropped += 1
        continue
      message, nbytes = self._message(peer, tag, x)
      try:
        link[1].send_multipart(wire.encode(message), copy=False, flags=zmq.NOBLOCK)
        self.sent += 1
        self.bytes_sent += nbytes
      except zmq.Again:
        self.dropped += 1

  def _message(self, peer: str, tag: Tag, x) -> tuple[dict, int]:
    """The message to `peer` that carries `x` (None: it will not come), and its array bytes."""
    a = None if x is None else np.asarray(x)
    return {"tag": list(tag), "x": a}, 0 if a is None else a.nbytes

  def _arrived(self, message: dict):
    """What goes into the inbox for an arrived message carrying data: its array (a transport
    that sends only a notice returns an `Incoming`).

    Raises:
      TypeError: a pull notice (`TransferPlane`) reached a plane that cannot pull.
    """
    if "pull" in message:
      raise TypeError(f"data plane: a pull notice for {message['tag']} reached a ZeroMQ-only "
                      "plane; every worker of a runtime must use the same transport")
    return message["x"]

  def _receive(self, timeout_s: float) -> bool:
    """Moves one arrived message into the inbox, waiting up to `timeout_s`; False if none."""
    if not self._inbox_sock.poll(max(0, int(timeout_s * 1000))):
      return False
    _, *frames = self._inbox_sock.recv_multipart(copy=False)
    message = wire.decode(frames)
    tag = tuple(message["tag"])
    if message["x"] is not None or "pull" in message:
      self.inbox[tag] = self._arrived(message)
    elif isinstance(self.inbox.get(tag), Incoming) and not self.inbox[tag].done.is_set():
      self.inbox[tag] = _WONT_COME  # (a pull still under way is abandoned)
      self.abandoned += 1
    else:  # (a message that did arrive is kept: "will not come" came late)
      self.inbox.setdefault(tag, _WONT_COME)
    return True

  def take(self, tag: Tag, wait_s: float = 0.0):
    """The message with `tag`, removed from the inbox, waiting for it up to `wait_s`; None if
    it has not arrived by then, if the control plane said it will not come, or if its sender's
    process is gone (its inbox port refuses connections: checked every `GONE_CHECK_S`).
    `missed` then says which of the three."""
    tag = tuple(tag)
    start = time.perf_counter()
    checked = start
    while True:
      while self._receive(0.0):  # whatever has arrived
        pass
      x = self.inbox.get(tag)
      incoming = isinstance(x, Incoming)
      if x is not None and not incoming:
        del self.inbox[tag]
        if x is _WONT_COME:
          self.missed = "cancelled"
          return None
        return x
      now = time.perf_counter()
      left = wait_s - (now - start)
      if incoming and x.done.wait(max(0.0, min(left, GONE_CHECK_S))):
        del self.inbox[tag]
        self.missed = None if x.error is None else f"pull failed: {x.error}"
        return x.value
      if left <= 0 or now - checked >= GONE_CHECK_S and self._gone(tag[3]):
        self.missed = "timed out" if left <= 0 else "sender gone"
        if incoming:  # a pull that may never end: left to its thread, counted
          del self.inbox[tag]
          self.abandoned += 1
        return None
      if now - checked >= GONE_CHECK_S:
        checked = now
      if not incoming:
        self._receive(min(left, GONE_CHECK_S))

  def _gone(self, peer: str) -> bool:
    """Whether `peer`'s process is gone: its inbox port refuses a TCP connection (a stopped
    process's kernel still accepts one; that is for the control plane's probes to find)."""
    link = self._links.get(peer)
    if link is None:
      return False
    host, _, port = link[0].removeprefix("tcp://").rpartition(":")
    try:
      socket.create_connection((host, int(port)), timeout=0.05).close()
    except ConnectionRefusedError:
      return True
    except OSError:
      return False
    return False

  def forget(self, before_step: int):
    for tag in [t for t in self.inbox if t[0] < before_step]:
      del self.inbox[tag]

  def close(self):
    for _, sock in self._links.values():
      sock.close()
    self._links.clear()
    self._inbox_sock.close()
