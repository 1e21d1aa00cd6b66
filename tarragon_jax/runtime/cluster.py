"""Worker processes on several hosts: host agents, the orchestrator's registry, the spawner.

One agent runs per host (`python -m tarragon_jax.launch`, started by the cluster's launcher).
It registers with the orchestrator's `Registry` (its address and how many devices it offers),
then starts worker processes on request, one device each, and delivers signals to them: it is
their parent, so a SIGKILL or SIGSTOP of a worker is a real signal on the worker's own host,
and a replacement starts without a round trip through the cluster's scheduler. Workers exit
with their agent; the agent exits when told, or when the orchestrator has been unreachable for
`orphan_s`. On the orchestrator, `AgentSpawner` is the process runtime's spawner over the
registered agents.

Protocol (ZeroMQ requests, `tarragon_jax.runtime.channel`):
- agent -> registry: {"op": "register", "host", "address", "probe_address", "slots"};
- orchestrator -> agent: {"op": "spawn", "device", "compile_cache", "start_timeout_s",
  "start_setting"} (replied once the worker has bound its endpoint: {"result": {"pid",
  "address", "probe_address"}}; an error if it exited first or was not ready within
  `start_timeout_s`: the agent kills it), {"op": "signal", "pid", "sig"}, {"op": "gone", "pid"}
  (None while the worker runs, else how it ended), {"op": "exit"}.
"""

from __future__ import annotations

import signal
import socket
import time

from absl import logging

from tarragon_jax.runtime.channel import (
  Bound,
  Connection,
  Endpoint,
  Pending,
  RemoteError,
  connection_lost,
)
from tarragon_jax.runtime.spawner import Child, SpawnError
from tarragon_jax.worker.fault_domain import WorkerDead

AGENT_REPLY_S = 10.0  # an agent's answer to a request it serves at once (beyond a start bound)
GONE_EVERY_S = 0.1  # how often a wait on an agent's worker asks the agent whether it runs
REGISTER_TIMEOUT_S = 600.0  # agents and the orchestrator wait this long for each other to start


def split_address(address: str) -> tuple[str, int]:
  """'HOST:PORT' -> (host, port), with a clear error for anything else."""
  host, sep, port = address.rpartition(":")
  if not sep or not port.isdigit() or not 0 < int(port) < 65535:
    raise ValueError(f"address {address!r}: expected HOST:PORT with PORT in 1..65534 "
                     f"(e.g. 'head-node:7000')")
  return host or "0.0.0.0", int(port)


def route_to(host: str, port: int) -> str:
  """This host's address on the route to (host, port): what peers there can connect to."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.connect((host, port))  # no packet is sent; the kernel picks the interface
    return s.getsockname()[0]


class Registry:
  """The orchestrator's side: agents register here (PORT for requests, PORT+1 for probes)."""

  def __init__(self, listen: str):
    host, port = split_address(listen)
    self.endpoint = Endpoint(host, port, port + 1)
    self.agents: list[dict] = []

  def wait(self, count: int, timeout_s: float = REGISTER_TIMEOUT_S) -> list[dict]:
    """Blocks until `count` agents have registered; their registrations, in order."""
    deadline = time.perf_counter() + timeout_s
    while len(self.agents) < count:
      request = self.endpoint.recv(max(0.0, deadline - time.perf_counter()))
      if request is None:
        raise TimeoutError(f"{len(self.agents)} of {count} host agents registered within "
                           f"{timeout_s} s; start `python -m tarragon_jax.launch "
                           f"--orchestrator=HOST:PORT` on every host")
      msg = request.message
      if msg.get("op") != "register":
        self.endpoint.reply(request, {"error": f"expected a registration, got {msg.get('op')}"})
        continue
      self.agents.append({k: msg[k] for k in ("host", "address", "probe_address", "slots")})
      self.endpoint.reply(request, {"ok": True, "agent": len(self.agents) - 1})
      logging.info("host agent %d registered: %s, %d devices", len(self.agents) - 1,
                   msg["host"], msg["slots"])
    return self.agents

  def close(self):
    self.endpoint.close()


class Agent:
  """One host's agent: starts and signals this host's worker processes."""

  def __init__(self, orchestrator: str, slots: int, platform: str = "cpu",
               host: str | None = None, orphan_s: float = 30.0):
    if slots < 1:
      raise ValueError(f"slots={slots}: an agent offers at least one device")
    o_host, o_port = split_address(orchestrator)
    self.host = host or route_to(o_host, o_port)
    self.slots, self.platform, self.orphan_s = slots, platform, orphan_s
    self.endpoint = Endpoint(self.host)
    self.registry = Connection(f"tcp://{o_host}:{o_port}", f"tcp://{o_host}:{o_port + 1}",
                               heartbeat_s=0.5, heartbeat_timeout_s=3.0)
    self.children: dict[int, Child] = {}
    self._starting: list[tuple[object, Child]] = []  # (spawn request, child) until READY

  def register(self, timeout_s: float):
    """Registers with the orchestrator, waiting up to `timeout_s` for it (it may start after
    its agents)."""
    reply = self.registry.call({"op": "register", "host": socket.gethostname(),
                                "address": self.endpoint.address,
                                "probe_address": self.endpoint.probe_address,
                                "slots": self.slots}, timeout_s)
    if reply is None or "error" in reply:
      raise RuntimeError(f"registration with the orchestrator failed: {reply}")
    logging.info("registered as host agent %d (%s, %d devices)", reply["agent"], self.host,
                 self.slots)

  def serve(self):
    """Serves until told to exit or orphaned."""
    unreachable_since = None
    while True:
      request = self.endpoint.recv(0.01 if self._starting else 0.5)
      self._answer_started()
      if request is not None and not self._handle(request):
        break
      if self.registry.probe(0.0):
        unreachable_since = None
      elif unreachable_since is None:
        unreachable_since = time.perf_counter()
      elif time.perf_counter() - unreachable_since > self.orphan_s:
        logging.warning("orchestrator unreachable for %.0f s: exiting", self.orphan_s)
        break
    self.close()

  def _handle(self, request) -> bool:
    msg = request.message
    op = msg.get("op")
    if op == "exit":
      self.endpoint.reply(request, {"ok": True})
      return False
    if op == "spawn":
      device = msg["device"]
      if not 0 <= device < self.slots:
        self.endpoint.reply(request, {"error": f"device={device}; this agent has devices "
                                               f"0..{self.slots - 1}"})
      else:
        start = Bound(msg["start_timeout_s"], msg["start_setting"])
        self._starting.append((request, Child(msg["compile_cache"], self.host, self.platform,
                                              device, start)))
    elif op in ("signal", "stop"):  # stop: SIGKILL, then reap
      child = self.children.get(msg["pid"])
      if child is not None and op == "signal":
        child.signal(msg["sig"])
      elif child is not None:
        child.stop()
      self.endpoint.reply(request, {"result": child is not None})
    elif op == "gone":
      child = self.children.get(msg["pid"])
      self.endpoint.reply(request, {"result": "this host's agent does not know it"
                                    if child is None else child.gone()})
    else:
      self.endpoint.reply(request, {"error": f"unknown op {op!r}; use spawn, signal, stop, "
                                             f"gone, exit"})
    return True

  def _answer_started(self):
    """Replies to spawn requests whose process has printed its READY line, has exited, or is
    past its start bound (then it is killed)."""
    for request, child in list(self._starting):
      try:
        addresses = child.started()
        if addresses is None:
          continue
        self.children[child.pid] = child
        self.endpoint.reply(request, {"result": {"pid": child.pid, "address": addresses[0],
                                                 "probe_address": addresses[1]}})
      except SpawnError as err:
        child.stop()
        self.endpoint.reply(request, {"error": str(err)})
      self._starting.remove((request, child))

  def close(self):
    for child in list(self.children.values()) + [c for _, c in self._starting]:
      child.stop()
    self.endpoint.close()
    self.registry.close()


class AgentChild:
  """A worker process that an agent started on its host; signals go through the agent.

  Each child has its own connection to its agent (a ZeroMQ socket belongs to one thread at a
  time, and children are started from the driver's and from replacement-builder threads). The
  agent enforces the start bound; the child's liveness is asked of the agent (at most once per
  `GONE_EVERY_S`), and a gone agent means gone workers (they exit with it)."""

  def __init__(self, agent: dict, device: int, compile_cache: str, where: str, start: Bound):
    self._agent = Connection(agent["address"], agent["probe_address"])
    self._rid = self._agent.send({"op": "spawn", "device": device,
                                  "compile_cache": compile_cache,
                                  "start_timeout_s": start.seconds,
                                  "start_setting": start.setting})
    self.where, self.start = where, start
    self.pid = None
    self._agent_lost = connection_lost(self._agent)
    self._gone: str | None = None
    self._asking: Pending | None = None  # the agent's answer to come: does the worker run?
    self._asked = 0.0

  def _pending(self, rid: int, method: str, seconds: float) -> Pending:
    return Pending(self._agent, rid, method, f"the host agent of {self.where}",
                   Bound(seconds, "cluster.AGENT_REPLY_S"), self._agent_lost)

  def ready(self) -> tuple[str, str]:
    """Waits for the agent's word that the process bound its endpoint; its addresses.

    Raises:
      SpawnError: the process exited, was not ready within its start bound (the agent kills
        it then), or the agent is gone or silent.
    """
    try:
      reply = self._pending(self._rid, "spawn", self.start.seconds + AGENT_REPLY_S).result()
    except (RemoteError, WorkerDead, TimeoutError) as err:
      raise SpawnError(f"{self.where}: the worker process did not start: {err}") from err
    self.pid = reply["pid"]
    return reply["address"], reply["probe_address"]

  def gone(self) -> str | None:
    """None while the process may run, else why it does not. Never waits: the agent is asked
    in the background (at most once per `GONE_EVERY_S`), and its answer read on a later call."""
    if self._gone is not None or self.pid is None:
      return self._gone
    if self._asking is not None and self._asking.arrived():
      try:
        self._gone = self._asking.result()
      except RemoteError:
        pass
      self._asking = None
    lost = self._agent_lost()
    if self._gone is None and lost is not None:
      self._gone = f"its host agent is gone ({lost}), and its workers with it"
    now = time.perf_counter()
    if self._gone is None and self._asking is None and now - self._asked >= GONE_EVERY_S:
      self._asked = now
      self._asking = self._pending(self._agent.send({"op": "gone", "pid": self.pid}), "gone",
                                   AGENT_REPLY_S)
    return self._gone

  def signal(self, sig: int):
    self._tell("signal", sig)

  def stop(self):
    """SIGKILL, reaped by the agent."""
    self._tell("stop", signal.SIGKILL)
    self._agent.close()

  def _tell(self, op: str, sig: int):
    if self.pid is None:
      return
    try:
      self._pending(self._agent.send({"op": op, "pid": self.pid, "sig": int(sig)}), op,
                    AGENT_REPLY_S).result()
    except WorkerDead:
      pass  # the agent is gone, and its workers with it
    except (RemoteError, TimeoutError) as err:
      logging.warning("%s: %s (signal %d) not confirmed: %s", self.where, op, sig, err)


class AgentSpawner:
  """Worker processes on the hosts of `hosts` agents registered with a registry listening on
  `listen` (HOST:PORT; PORT+1 too); slot i is one device of one host, in registration order."""

  def __init__(self, listen: str, hosts: int, timeout_s: float = REGISTER_TIMEOUT_S):
    self.registry = Registry(listen)
    self.agents = self.registry.wait(hosts, timeout_s)
    self._where = [(i, d) for i, a in enumerate(self.agents) for d in range(a["slots"])]
    self.slots = list(range(len(self._where)))

  def spawn(self, slot: int | None, compile_cache: str, start: Bound) -> AgentChild:
    """A process on `slot`'s host and device, which must say READY within `start`."""
    if slot is None:
      raise ValueError("agents start device workers only; deviceless processes run locally")
    i, device = self._where[slot]
    return AgentChild(self.agents[i], device, compile_cache,
                      f"agent {i} ({self.agents[i]['host']}) device {device}", start)

  def close(self):
    """Tells every agent to exit (their worker processes exit with them)."""
    for agent in self.agents:
      conn = Connection(agent["address"], agent["probe_address"])
      conn.call({"op": "exit"}, AGENT_REPLY_S)
      conn.close()
    self.registry.close()
