"""The data plane: activations go from worker to worker, never through the control plane.

Every worker has a `DataPlane`: an inbox that peers send to, and links to its peers, whose
addresses the control plane hands out (`connect`, again when a replacement takes a position).
An AW sends each EW its packed buffer for a layer, an EW sends each AW its results; each
message carries a tag (step, layer, attempt, sender) so that a receiver takes exactly the
message it expects, whatever arrived before it or in between (a replay after a failover is a
new attempt). Two transports:

- `LocalPlane` (local runtime): a send is an asynchronous `device_put` onto the receiver's
  cell, straight into its inbox; nothing waits.
- `runtime.peer_plane.ZmqPlane` (process runtime): host arrays over ZeroMQ, peer to peer.

A send never blocks and never fails: a message to a peer that is gone is lost, and the
receiver, which takes with a bound, says what did not arrive. Detection is not the data
plane's business (the control plane's probes decide who failed).
"""

from __future__ import annotations

import jax

from tarragon_jax.mesh.transfer import Transfers

Tag = tuple  # (step, layer, attempt, sender name)
KV_LAYER = -1  # the layer of a tag that carries an AW's step KV to the snapshot store


def kv_tag(step: int, aw: str) -> Tag:
  """The tag of AW `aw`'s KV of step `step`, sent to the snapshot store's inbox."""
  return (step, KV_LAYER, 0, aw)


class Peer:
  """A worker with a data plane (`self.plane`): what the control plane links."""

  plane: object

  @property
  def address(self):
    """Where peers send to this worker (its data plane's inbox)."""
    return self.plane.address

  def link(self, peers: dict):
    """Links this worker's data plane to peers: {name: address} (see `connect`)."""
    self.plane.connect(peers)


class LocalPlane:
  """The in-process transport: `target` is the sharding of this worker's cell (where what is
  sent to it lands); its address is the plane itself."""

  def __init__(self, target, transfers: Transfers | None = None):
    self.target = target
    self.transfers = transfers or Transfers()  # counts the bytes moved between cells
    self.inbox: dict[Tag, jax.Array] = {}
    self.peers: dict[str, LocalPlane] = {}
    self.missed = None  # why the last `take` returned None

  @property
  def address(self) -> LocalPlane:
    return self

  def connect(self, peers: dict):
    """Links to peers: {name: address} (a name given again is relinked: a replacement)."""
    self.peers.update(peers)

  def send(self, items: list[tuple[str, Tag, jax.Array | None]]):
    """Sends (peer, tag, array) messages, in one batched `device_put`; a peer not linked (or
    gone) gets nothing. An array None says that the message with this tag will not come."""
    items = [(self.peers[p], tag, x) for p, tag, x in items if p in self.peers]
    data = [(peer, tag, x) for peer, tag, x in items if x is not None]
    arrived = self.transfers.send_many([(x, peer.target) for peer, _, x in data]) if data else []
    for (peer, tag, _), x in zip(data, arrived):
      peer.inbox[tag] = x
    for peer, tag, x in items:
      if x is None:  # (a message that did arrive is kept: "will not come" came too late)
        peer.inbox.setdefault(tag, None)

  def take(self, tag: Tag, wait_s: float = 0.0):
    """The message with `tag`, removed from the inbox; None if it has not arrived or will not
    come (here a message is in the inbox as soon as it is sent, so nothing waits); `missed`
    then says which."""
    del wait_s
    return self.inbox.pop(tag, None)

  def forget(self, before_step: int):
    """Drops messages of steps before `before_step` (left by a failover: a dead peer's, or a
    round that was replayed)."""
    for tag in [t for t in self.inbox if t[0] < before_step]:
      del self.inbox[tag]

  def close(self):
    self.inbox.clear()
