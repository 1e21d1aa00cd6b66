"""`ZmqPlane`: the data plane of the process runtime, host arrays over ZeroMQ, peer to peer.

Each worker process binds one ROUTER socket (its inbox; its address goes to the control plane
in the reply to `init`) and holds one DEALER socket per peer. Sends are non-blocking and
`IMMEDIATE`: nothing is queued for a peer whose connection is down, so a message to a dead peer
is dropped at once instead of piling up. Messages travel in the wire format of
`runtime/wire.py` (a JSON header, the array as its own frame, no copy on receipt).
"""

from __future__ import annotations

import time

import numpy as np
import zmq

from tarragon_jax.runtime import wire
from tarragon_jax.runtime.channel import _bind
from tarragon_jax.worker.dataplane import Tag


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
      sock.setsockopt(zmq.IMMEDIATE, 1)  # no queue for a peer that is not connected
      sock.connect(address)
      self._links[name] = (address, sock)

  def send(self, items: list[tuple[str, Tag, object]]):
    """Sends (peer, tag, array) messages; each is fetched to the host first. A message that
    cannot be queued (the peer is not connected, or its queue is full) is dropped."""
    for peer, tag, x in items:
      link = self._links.get(peer)
      a = np.asarray(x)
      if link is None:
        self.dropped += 1
        continue
      try:
        link[1].send_multipart(wire.encode({"tag": list(tag), "x": a}), copy=False,
                               flags=zmq.NOBLOCK)
        self.sent += 1
        self.bytes_sent += a.nbytes
      except zmq.Again:
        self.dropped += 1

  def _receive(self, timeout_s: float) -> bool:
    """Moves one arrived message into the inbox, waiting up to `timeout_s`; False if none."""
    if not self._inbox_sock.poll(max(0, int(timeout_s * 1000))):
      return False
    _, *frames = self._inbox_sock.recv_multipart(copy=False)
    message = wire.decode(frames)
    self.inbox[tuple(message["tag"])] = message["x"]
    return True

  def take(self, tag: Tag, wait_s: float = 0.0):
    """The message with `tag`, removed from the inbox, waiting up to `wait_s` for it; None if
    it has not arrived by then."""
    tag = tuple(tag)
    deadline = time.perf_counter() + wait_s
    while True:
      while self._receive(0.0):  # whatever has arrived
        pass
      if tag in self.inbox:
        return self.inbox.pop(tag)
      left = deadline - time.perf_counter()
      if left <= 0:
        return None
      self._receive(min(left, 0.01))

  def forget(self, before_step: int):
    for tag in [t for t in self.inbox if t[0] < before_step]:
      del self.inbox[tag]

  def close(self):
    for _, sock in self._links.values():
      sock.close()
    self._links.clear()
    self._inbox_sock.close()
