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
- orchestrator -> agent: {"op": "spawn", "device", "compile_cache"} (replied once the worker
  has bound its endpoint: {"pid", "address", "probe_address"}), {"op": "signal", "pid",
  "sig"}, {"op": "exit"}.
"""

from __future__ import annotations

import select
import signal
import socket
import time

from absl import logging

from tarragon_jax.runtime.channel import Connection, Endpoint
from tarragon_jax.runtime.spawner import Child, SpawnError


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

  def wait(self, count: int, timeout_s: float = 600.0) -> list[dict]:
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

  def register(self, timeout_s: float = 600.0):
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
        self._starting.append((request, Child(msg["compile_cache"], self.host, self.platform,
                                              device)))
    elif op == "signal":
      child = self.children.get(msg["pid"])
      if child is not None:
        child.signal(msg["sig"])
      self.endpoint.reply(request, {"ok": child is not None})
    else:
      self.endpoint.reply(request, {"error": f"unknown op {op!r}; use spawn, signal, exit"})
    return True

  def _answer_started(self):
    """Replies to spawn requests whose process has printed its READY line."""
    for request, child in list(self._starting):
      readable, _, _ = select.select([child.proc.stdout], [], [], 0)
      if not readable:
        continue
      self._starting.remove((request, child))
      try:
        address, probe_address = child.ready()
        self.children[child.pid] = child
        self.endpoint.reply(request, {"pid": child.pid, "address": address,
                                      "probe_address": probe_address})
      except SpawnError as err:
        self.endpoint.reply(request, {"error": str(err)})

  def close(self):
    for child in list(self.children.values()) + [c for _, c in self._starting]:
      child.stop()
    self.endpoint.close()
    self.registry.close()


class AgentChild:
  """A worker process that an agent started on its host; signals go through the agent.

  Each child has its own connection to its agent (a ZeroMQ socket belongs to one thread at a
  time, and children are started from the driver's and from replacement-builder threads)."""

  def __init__(self, agent: dict, device: int, compile_cache: str, where: str):
    self._agent = Connection(agent["address"], agent["probe_address"])
    self._rid = self._agent.send({"op": "spawn", "device": device,
                                  "compile_cache": compile_cache})
    self.where = where
    self.pid = None

  def ready(self) -> tuple[str, str]:
    reply = self._agent.result(self._rid, 300.0)
    if reply is None or "error" in reply:
      raise SpawnError(f"{self.where}: the worker process did not start "
                       f"({'no reply in 300 s' if reply is None else reply['error']})")
    self.pid = reply["pid"]
    return reply["address"], reply["probe_address"]

  def signal(self, sig: int):
    if self.pid is not None:
      self._agent.call({"op": "signal", "pid": self.pid, "sig": int(sig)}, 10.0)

  def stop(self):
    self.signal(signal.SIGKILL)
    self._agent.close()


class AgentSpawner:
  """Worker processes on the hosts of `hosts` agents registered with a registry listening on
  `listen` (HOST:PORT; PORT+1 too); slot i is one device of one host, in registration order."""

  def __init__(self, listen: str, hosts: int, timeout_s: float = 600.0):
    self.registry = Registry(listen)
    self.agents = self.registry.wait(hosts, timeout_s)
    self._where = [(i, d) for i, a in enumerate(self.agents) for d in range(a["slots"])]
    self.slots = list(range(len(self._where)))

  def spawn(self, slot: int | None, compile_cache: str) -> AgentChild:
    if slot is None:
      raise ValueError("agents start device workers only; deviceless processes run locally")
    i, device = self._where[slot]
    return AgentChild(self.agents[i], device, compile_cache,
                      f"agent {i} ({self.agents[i]['host']}) device {device}")

  def close(self):
    """Tells every agent to exit (their worker processes exit with them)."""
    for agent in self.agents:
      conn = Connection(agent["address"], agent["probe_address"])
      conn.call({"op": "exit"}, 5.0)
      conn.close()
    self.registry.close()
