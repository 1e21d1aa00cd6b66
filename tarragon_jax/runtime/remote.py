"""The process runtime: every AW and EW its own OS process, driven through proxies.

`ProcessRuntime` gives the engine cells that are process slots, starts a
`tarragon_jax.runtime.host` process per worker (through a spawner: on this host, or as Ray
actors on a cluster's nodes) and hands back a `RemoteWorker` proxy with the worker's interface;
the snapshot store is a process too (`RemoteStore`). A proxy call sends a request and returns a
`Pending` reply; the engine waits for it inside the exchange, with the same detector as in the
local runtime (a late reply is silence; the peer's probe thread answers or not). Activations
travel between workers directly, over their data planes (`ZmqPlane`: each worker's address
comes back from its `init`, and the engine hands it to its peers); the driver's messages carry
control, tokens and KV only, and it counts the array bytes they carry (`ProcessRuntime.bytes`).
A fault is a real signal: `kill` is SIGKILL, `hang` is SIGSTOP.
"""

from __future__ import annotations

import dataclasses
import signal

import numpy as np

from tarragon_jax.mesh.cells import carve
from tarragon_jax.runtime import wire
from tarragon_jax.runtime.channel import Bound, Connection, Pending, RemoteError
from tarragon_jax.runtime.compile_cache import DEFAULT_COMPILE_CACHE
from tarragon_jax.runtime.peer_plane import ZmqPlane
from tarragon_jax.runtime.remote_store import RemoteStore
from tarragon_jax.runtime.spawner import LocalSpawner, SpawnError
from tarragon_jax.worker.fault_domain import FaultDomain, Health


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


def _bound(rc, field: str) -> Bound:
  return Bound(getattr(rc, field), f"ResilienceConfig.{field}")


class RemoteWorker(FaultDomain):
  """A proxy for one worker process (`child`, from a spawner); methods return `Pending`.

  Every reply is waited for with a bound from `resilience` (a `ResilienceConfig`: `init` by
  `build_timeout_s`, `warm_up` by `warm_up_timeout_s`, any other call by the detection
  deadline) and with the process's liveness: a wait on a worker whose process is gone ends at
  once with `WorkerDead`.
  """

  def __init__(self, kind: str, index: int, cell: ProcessCell, cfg, resilience, child):
    self.kind, self.index, self.cell, self.cfg = kind, index, cell, cfg
    self.name = f"{kind}{index}"
    detection = resilience.detection
    self.probe_s = detection.probe_interval_s
    self._bounds = {"init": _bound(resilience, "build_timeout_s"),
                    "warm_up": _bound(resilience, "warm_up_timeout_s")}
    self._deadline = Bound(detection.deadline_s, "DetectionConfig.deadline_s")
    self.child = child
    self.conn = None
    self.address = None  # its data plane's, once built
    # (array bytes, of which floating point) through this proxy, per method: sent under its
    # name, received under "<method>:reply"
    self.bytes: dict[str, tuple[int, int]] = {}

  def connect(self):
    """Waits for the process to bind its endpoint (Python and JAX start) and connects.

    Raises:
      SpawnError: the process exited first, or was not ready within its start bound.
    """
    try:
      address, probe_address = self.child.ready()
    except SpawnError as err:
      raise SpawnError(f"{self.name}: {err}") from err
    # Heartbeats every half probe interval; three missed intervals drop the probe connection
    # (a worker starved of CPU on a busy host is not declared dead for one late PONG).
    self.conn = Connection(address, probe_address, heartbeat_s=self.probe_s / 2,
                           heartbeat_timeout_s=3 * self.probe_s)

  def gone(self) -> str | None:
    """None while the worker's process may still answer, else why it never will."""
    why = self.child.gone()
    if why is None and self.conn is not None and self.conn.disconnected():
      why = "its connection closed and its port refuses"
    return why

  def _send(self, method: str, message: dict) -> Pending:
    self._count(method, message)
    return Pending(self.conn, self.conn.send(message), method, self.name,
                   self._bounds.get(method, self._deadline), self.gone,
                   slice_s=self.probe_s,
                   on_reply=lambda reply: self._count(f"{method}:reply", reply))

  def _count(self, method: str, message):
    total, floating = wire.array_bytes(message)
    before = self.bytes.get(method, (0, 0))
    self.bytes[method] = (before[0] + total, before[1] + floating)

  def request(self, method: str, *args) -> Pending:
    return self._send(method, {"op": "call", "method": method, "args": args})

  def cast(self, method: str, *args):
    """A call whose reply nobody waits for (the worker serves its calls in order, so the next
    call sees its effect)."""
    message = {"op": "cast", "method": method, "args": args}
    self._count(method, message)
    self.conn.send(message)

  def init(self, spec: dict) -> Pending:
    """Has the process load its weights (from weights_dir) and build its worker; its result
    carries the worker's data-plane address."""
    return self._send("init", {"op": "init", "spec": spec})

  def set_table(self, active):
    self.cast("set_table", np.asarray(active))

  def link(self, peers: dict):
    self.cast("link", peers)

  # -- faults are signals ----------------------------------------------------------------------

  def probe(self) -> bool:
    return self.conn.probe(self.probe_s)

  def disconnected(self) -> bool:
    """True once the process is known to be gone (it exited, or its connection dropped and its
    port refuses): a certainty, unlike a missed probe."""
    return self.gone() is not None

  def kill(self):
    """SIGKILL (fail-stop); the driver still learns of it by detection."""
    self.child.signal(signal.SIGKILL)
    self.health = Health.DEAD

  def hang(self):
    self.child.signal(signal.SIGSTOP)
    self.health = Health.HUNG

  def close(self):
    self.child.stop()
    if self.conn is not None:
      self.conn.close()


def _forward(method: str):
  def call(self, *args) -> Pending:
    return self.request(method, *args)
  call.__name__ = method
  call.__doc__ = f"`{method}` in the worker process (a Pending reply)."
  return call


for _method in ("begin", "attend", "combine", "sample", "run_step", "restore", "cache_copy",
                "warm_up", "run_layer", "serve_step", "sync"):
  setattr(RemoteWorker, _method, _forward(_method))


TRANSPORTS = ("zmq", "transfer")


class ProcessRuntime:
  """Workers as processes, one device each: on this host (`LocalSpawner`, default) or as
  actors on the nodes of a Ray cluster (`ray_spawner.RaySpawner`). The snapshot store is a
  process on this host (on Ray: an actor on this node), with a standby process started ahead so
  that a new store is ready at once. Closing the runtime stops its processes; the spawner
  belongs to the caller (it may serve several).

  Every wait is bounded by the engine's `ResilienceConfig` (learned in `start_workers`, or
  given to `new_store`) and ends at once when the process waited on is gone.
  """

  remote = True
  autonomous = True  # each worker process runs a whole step by itself (`run_step`)

  def __init__(self, spawner=None, compile_cache: str = DEFAULT_COMPILE_CACHE,
               transport: str = "zmq"):
    """`transport`: how activations go between worker processes, one of `TRANSPORTS`: "zmq"
    (host arrays over ZeroMQ, `ZmqPlane`) or "transfer" (pulls with jax.experimental.transfer,
    `TransferPlane`). "zmq" is the default on every platform: on CPU it is the faster of the two
    (docs/results.md, "Process runtime"); on GPU "transfer" moves arrays device to device and
    may win there (`experiments.failover --config.runtime=process` compares both)."""
    if transport not in TRANSPORTS:
      raise ValueError(f"ProcessRuntime: transport={transport!r}; use one of {TRANSPORTS}")
    self.spawner = spawner or LocalSpawner()
    self.compile_cache = compile_cache
    self.transport = transport
    self.workers: list[RemoteWorker] = []
    self.resilience = None  # the engine's ResilienceConfig, once it has started workers
    self._standby_store = None
    self.stores: list[RemoteStore] = []
    self._planes: list[ZmqPlane] = []

  def devices(self) -> list:
    return list(self.spawner.slots)

  def nodes(self) -> list[list]:
    """The slots of each node that can fail as a whole (a `RaySpawner`'s nodes; none on one
    host)."""
    return self.spawner.nodes()

  def data_plane(self) -> ZmqPlane:
    """The control plane's own link to the workers' data planes (it sends no arrays)."""
    plane = ZmqPlane()
    self._planes.append(plane)
    return plane

  def driver_bytes(self) -> dict[str, tuple[int, int]]:
    """(array bytes, of which floating point) that passed through this process to the workers,
    per method, and back from them, per "<method>:reply"."""
    out: dict[str, tuple[int, int]] = {}
    for w in self.workers:
      for method, (total, floating) in w.bytes.items():
        before = out.get(method, (0, 0))
        out[method] = (before[0] + total, before[1] + floating)
    return out

  def carve(self, plan, devices):
    return carve(plan, devices, make_cell=ProcessCell)

  def start_worker(self, engine, kind: str, index: int, cell: ProcessCell) -> RemoteWorker:
    """Starts the process, then has it load its weights (from weights_dir) and build its worker."""
    return self.start_workers(engine, [(kind, index, cell)])[0]

  def start_workers(self, engine, specs: list[tuple]) -> list[RemoteWorker]:
    """Starts (kind, index, cell) workers side by side: all processes, then all inits.

    Each process must say READY within `ResilienceConfig.start_timeout_s` and build its
    worker within `build_timeout_s`. If any fails, every process of this call is stopped.

    Raises:
      SpawnError: a process exited before it was ready, or was not ready in time.
      WorkerDead: a process died while it built its worker (named, with its exit code).
      TimeoutError: a live process did not build its worker within `build_timeout_s`.
      RemoteError: building the worker failed in its process (its traceback).
    """
    rc = engine.engine_cfg.resilience
    self.resilience = rc
    start = _bound(rc, "start_timeout_s")
    p = engine.state.placement
    workers = []
    try:
      for kind, index, cell in specs:
        workers.append(RemoteWorker(kind, index, cell, engine.cfg, rc,
                                    self.spawner.spawn(cell.devices[0], self.compile_cache,
                                                       start)))
      self.workers += workers
      for w in workers:
        w.connect()
      inits = [w.init(dict(kind=w.kind, index=w.index, config=engine.cfg.to_dict(),
                           weights_dir=engine.weights_dir,
                           fingerprint=engine.weights_fingerprint,
                           parts=engine.part_fingerprints,
                           slots=engine.engine_cfg.slots_per_aw, snapshots=rc.snapshots,
                           num_ew=p.num_ew, contents=p.contents,
                           transport=self.transport)) for w in workers]
      for w, pending in zip(workers, inits):
        try:
          w.address = pending.result()["address"]
        except RemoteError as err:
          raise RemoteError(f"{w.name}: init failed: {err}") from err
    except BaseException:
      for w in workers:  # useless now: nobody gets their proxies
        w.close()
      raise
    return workers

  def new_store(self, cfg, directory: str, options: dict, detection,
                resilience=None) -> RemoteStore:
    """A snapshot store process (the standby, if it still runs; else a new one), and the next
    standby.

    Args:
      resilience: the `ResilienceConfig` whose `start_timeout_s` bounds the process's start
        (default: the one `start_workers` was given).

    Raises:
      SpawnError: no store process could be started (the standby and a new one both failed).
    """
    rc = resilience or self.resilience
    if rc is None:
      raise ValueError("ProcessRuntime.new_store: pass resilience= (the ResilienceConfig whose "
                       "start_timeout_s bounds the store's start), or start the workers first")
    start = _bound(rc, "start_timeout_s")
    standby, self._standby_store = self._standby_store, None
    tries = ([("the standby", standby)] if standby is not None else []) + [("a new one", None)]
    errors = []
    for which, child in tries:
      try:
        child = child or self.spawner.spawn(None, self.compile_cache, start)
        store = RemoteStore(child, cfg, directory, options, detection)
        break
      except (SpawnError, OSError) as err:
        if child is not None:
          child.stop()
        errors.append(f"{which}: {err}")
    else:
      raise SpawnError(f"no snapshot store process could be started ({'; '.join(errors)})")
    self.stores.append(store)
    try:
      self._standby_store = self.spawner.spawn(None, self.compile_cache, start)
    except OSError:  # no standby: the next store starts from scratch (or fails then)
      self._standby_store = None
    return store

  def close(self):
    for plane in self._planes:
      plane.close()
    for w in self.workers:
      w.close()
    for store in self.stores:
      store.stop()
    if self._standby_store is not None:
      self._standby_store.stop()
