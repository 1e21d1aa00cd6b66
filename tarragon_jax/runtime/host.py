"""A worker process: one AW, EW or snapshot store, its own JAX runtime and device.

  python -m tarragon_jax.runtime.host [--compile_cache=DIR] [--host=ADDRESS]

Prints `READY <address> <probe address>` once its endpoint is bound on ADDRESS (default
127.0.0.1), then serves (and exits when the process that started it is gone):
- {"op": "init", "spec": {...}}: builds the worker: an AW or EW loads its part of the weights
  from weights_dir (the same `AttentionWorker` / `ExpertWorker` classes the local runtime
  uses) onto this process's device, refusing weights whose fingerprint is not the spec's,
  and binds its data plane (`ZmqPlane`, or `TransferPlane` with spec transport="transfer";
  the reply carries its address: peers send activations there directly); a store opens its
  durable tier (`SnapshotStore`) and binds a data-plane inbox, where AWs send their KV
  directly (`DirectStore`), and the process exits (code 70) if the store's thread dies;
- {"op": "call", "method": m, "args": [...]}: calls the worker; device arrays in the result
  come back as host arrays;
- {"op": "cast", ...}: a call whose reply nobody reads (none is sent);
- {"op": "attr", "name": a}: an attribute's value;
- {"op": "mark"} (store): replied once the store has applied everything sent before it (with
  its `bytes_in` then);
- {"op": "exit"}.
A failure to build or to serve a call is replied as {"error": "..."}.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tarragon_jax.config import ModelConfig  # noqa: E402
from tarragon_jax.mesh.cells import Cell  # noqa: E402
from tarragon_jax.resilience.snapshot_store import SnapshotStore  # noqa: E402
from tarragon_jax.runtime import compile_cache  # noqa: E402
from tarragon_jax.runtime.channel import Endpoint  # noqa: E402
from tarragon_jax.runtime.peer_plane import ZmqPlane  # noqa: E402
from tarragon_jax.runtime.transfer_plane import TransferPlane  # noqa: E402
from tarragon_jax.weights_source import load_worker_weights  # noqa: E402
from tarragon_jax.worker.dataplane import kv_tag  # noqa: E402
from tarragon_jax.worker.workers import AttentionWorker, ExpertWorker  # noqa: E402


def to_host(x):
  """Device arrays (in nested tuples/lists) to numpy; everything else unchanged."""
  if isinstance(x, jax.Array):
    return np.asarray(x)
  if isinstance(x, (tuple, list)):
    return type(x)(to_host(v) for v in x)
  return x


EXIT_STORE_DIED = 70  # EX_SOFTWARE: the store's thread died


def _store_died(err: BaseException):
  """Ends the process when the store's thread dies (e.g. a durable-tier write failed): the
  driver then sees a dropped connection, a certainty, instead of a store that answers probes
  and applies nothing."""
  print(f"snapshot store thread died: {err!r}", file=sys.stderr, flush=True)
  traceback.print_exception(err, file=sys.stderr)
  sys.stderr.flush()
  os._exit(EXIT_STORE_DIED)


class DirectStore:
  """The snapshot store of a store process, with a data-plane inbox (`address`): an AW sends
  its step's KV there itself, and the control plane's `log_step` carries, instead of the KV,
  {"from": the AW's data-plane address}. Everything else is the `SnapshotStore`'s."""

  def __init__(self, store: SnapshotStore, plane: ZmqPlane, wait_s: float):
    self.store, self.plane, self.wait_s = store, plane, wait_s
    self.address = plane.address
    self.lost_steps = 0  # steps whose KV did not come: gaps, not wrong state

  def log_step(self, aw: int, seq: int, rows, kv):
    """Takes a KV sent directly (it left the AW before the AW's reply to the control plane,
    so it is normally here already); one that does not come within `wait_s`, or whose AW is
    gone, leaves the step out: the store commits nothing of it (a gap), as for a lost step."""
    if isinstance(kv, dict):
      name = f"aw{aw}"
      self.plane.connect({name: kv["from"]})  # (to see the AW's port refuse if it died)
      kv = self.plane.take(kv_tag(seq, name), self.wait_s)
      self.plane.forget(before_step=seq - 1)  # (KV whose step was never logged: its AW failed)
      if kv is None:
        self.lost_steps += 1
        return
    self.store.log_step(aw, seq, rows, kv)

  def __getattr__(self, name):
    return getattr(self.store, name)


def build(spec: dict, host: str = "127.0.0.1"):
  cfg = ModelConfig.from_dict(spec["config"])
  if spec["kind"] == "store":
    return DirectStore(SnapshotStore(cfg, spec["directory"], **spec["options"],
                                     on_death=_store_died), ZmqPlane(host), spec["kv_wait_s"])
  cell = Cell(f"{spec['kind']}{spec['index']}", (jax.devices()[0],))
  # Only the worker's part of the weights is read (an EW's: its slots, `contents`).
  # `fingerprint`, `parts`: the weights the driver serves; a checkpoint holding others is
  # refused.
  contents = None if spec["kind"] == "aw" else np.asarray(spec["contents"])[:, spec["index"]]
  params = load_worker_weights(spec["weights_dir"], cfg, contents,
                               expect=spec.get("fingerprint"), expect_parts=spec.get("parts"))
  # On ZeroMQ arrays arrive as host arrays; pulled with `transfer`, as arrays on this device.
  transfer = spec.get("transport") == "transfer"
  plane = TransferPlane(host, cell.devices[0]) if transfer else ZmqPlane(host)
  if spec["kind"] == "aw":
    return AttentionWorker(spec["index"], cell, cfg, params, spec["slots"], plane,
                           spec["snapshots"], host_inputs=not transfer, host_routing=True)
  return ExpertWorker(spec["index"], cell, cfg, params, spec["num_ew"], plane,
                      host_inputs=not transfer)


def serve(endpoint: Endpoint, host: str = "127.0.0.1"):
  worker = None
  marks = []  # (request, store mark) waiting for the store to catch up
  while True:
    request = endpoint.recv(timeout_s=0.001 if marks else None)
    for waiting in [m for m in marks if worker.caught_up(m[1])]:
      marks.remove(waiting)
      endpoint.reply(waiting[0], {"result": worker.bytes_in})
    if request is None:
      continue
    msg = request.message
    op = msg["op"]
    try:
      if op == "exit":
        endpoint.reply(request, {"ok": True})
        return
      if op == "init":
        worker = build(msg["spec"], host)
        reply = {"result": {"address": getattr(worker, "address", None)}}
      elif op == "mark":
        marks.append((request, worker.mark()))
        continue
      elif op == "attr":
        reply = {"result": getattr(worker, msg["name"])}
      else:
        out = getattr(worker, msg["method"])(*msg["args"])
        if op == "cast":
          continue
        reply = {"result": to_host(out)}
    except Exception:  # noqa: BLE001 - the driver decides what a failed call means
      if op == "cast":
        traceback.print_exc()
        continue
      reply = {"error": traceback.format_exc(limit=8)}
    endpoint.reply(request, reply)


def bind(compile_cache_dir: str, host: str = "127.0.0.1") -> Endpoint:
  """This process as a worker: its compile cache on, its endpoint bound on `host`."""
  compile_cache.enable_compile_cache(compile_cache_dir)
  return Endpoint(host)


def serve_until_exit(endpoint: Endpoint, host: str = "127.0.0.1"):
  """Serves until told to exit, then ends the process without the interpreter's shutdown: a
  pull the data plane abandoned (`TransferPlane`) would wake in it and abort the process."""
  serve(endpoint, host)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


def main(argv: list[str]):
  cache = next((a.split("=", 1)[1] for a in argv if a.startswith("--compile_cache=")),
               compile_cache.DEFAULT_COMPILE_CACHE)
  host = next((a.split("=", 1)[1] for a in argv if a.startswith("--host=")), "127.0.0.1")
  endpoint = bind(cache, host)
  parent = os.getppid()
  threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
  print(f"READY {endpoint.address} {endpoint.probe_address}", flush=True)
  serve_until_exit(endpoint, host)


def _exit_with_parent(parent: int):
  while os.getppid() == parent:
    time.sleep(0.5)
  os._exit(0)


if __name__ == "__main__":
  main(sys.argv[1:])
