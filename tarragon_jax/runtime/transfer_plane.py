"""`TransferPlane`: the process runtime's data plane with `jax.experimental.transfer` pulls.

A sender offers each array on its process's transfer server (`await_pull`) and sends its
receiver a notice over ZeroMQ (the tag, the server's address, an id, the shape and dtype); the
receiver pulls the array straight onto its own device (device to device on GPU/TPU; on CPU a
copy between processes). Everything else is `ZmqPlane`'s: the notices, "will not come", the
links, and the waits that end when the sender's process is gone or the control plane cancels.

A pull cannot be cancelled, and one for an array that a live peer never serves can hang for
far longer than its own timeout, so each pull runs in a thread of its own and the
receiver's wait is the watchdog: a wait that ends first (its bound, the sender gone, a cancel)
abandons the pull and counts it (`abandoned`). Detection stays on the control plane's probes:
a dead peer surfaces in a pull only after ~0.14 s. A process that has abandoned a pull must end
with `os._exit` (as worker processes do): the interpreter's shutdown tears the transfer server
down under the waiting thread, which wakes into a Python that is ending and aborts the process.
"""

from __future__ import annotations

import itertools
import threading

import jax
import numpy as np
from jax.experimental import transfer

from tarragon_jax.runtime.peer_plane import Incoming, ZmqPlane
from tarragon_jax.worker.dataplane import Tag

HOST_PEERS = ("store",)  # peers that take host arrays over ZeroMQ (the store has no device)


class TransferPlane(ZmqPlane):
  """A worker process's data plane whose arrays are pulled (see the module docstring).

  Arrays arrive as device arrays on `device` (the worker's); its transfer server listens on
  `host` only (by default it would listen on every interface).
  """

  def __init__(self, host: str = "127.0.0.1", device=None):
    super().__init__(host)
    self.device = device or jax.devices()[0]
    self._server = transfer.start_transfer_server(self.device.client, f"{host}:0",
                                                  [f"{host}:0"])
    self._server_address = self._server.address()
    self._ids = itertools.count(1)
    self._connections: dict[str, object] = {}  # a peer server's address -> its connection
    self._sharding = jax.sharding.SingleDeviceSharding(self.device)

  def _message(self, peer: str, tag: Tag, x) -> tuple[dict, int]:
    if x is None or peer in HOST_PEERS:
      return super()._message(peer, tag, x)
    if not isinstance(x, jax.Array):
      x = jax.device_put(x, self._sharding)
    uid = next(self._ids)
    self._server.await_pull(uid, [x])
    notice = [self._server_address, uid, list(x.shape), np.dtype(x.dtype).name]
    return {"tag": list(tag), "x": None, "pull": notice}, x.nbytes

  def _arrived(self, message: dict) -> Incoming:
    address, uid, shape, dtype = message["pull"]
    incoming = Incoming()
    connection = self._connections.get(address)
    if connection is None:
      connection = self._connections[address] = self._server.connect(address)
    spec = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=self._sharding)

    def pull():  # (`pull` returns at once; the array is in once it is ready)
      try:
        incoming.value = connection.pull(uid, [spec])[0].block_until_ready()
      except Exception as err:  # noqa: BLE001 - the receiver says what did not come, and why
        incoming.error = repr(err)
      incoming.done.set()

    threading.Thread(target=pull, name=f"pull-{uid}", daemon=True).start()
    return incoming
