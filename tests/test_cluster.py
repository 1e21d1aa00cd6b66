"""Several hosts, on loopback: host agents (`python -m tarragon_jax.launch`) register with the
orchestrator, start its worker processes as their own children and deliver its signals."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from tarragon_jax.runtime.channel import Bound
from tarragon_jax.runtime.cluster import AgentSpawner, split_address
from tarragon_jax.runtime.remote import ProcessRuntime
from tests.test_process_runtime import _check, _serve


def _free_port_pair() -> int:
  """A port p such that p and p + 1 are free (the registry binds both)."""
  for _ in range(50):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    try:
      with socket.socket() as s:
        s.bind(("127.0.0.1", port + 1))
      return port
    except OSError:
      continue
  raise RuntimeError("no two adjacent free ports")


def _parent(pid: int) -> int:
  with open(f"/proc/{pid}/stat") as f:
    return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def agents():
  port = _free_port_pair()
  procs = [subprocess.Popen([sys.executable, "-m", "tarragon_jax.launch",
                             f"--orchestrator=127.0.0.1:{port}", "--slots=3",
                             "--host=127.0.0.1"]) for _ in range(2)]
  yield port, procs
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def test_workers_on_two_host_agents_survive_a_kill_and_the_agents_exit_at_the_end(agents):
  port, procs = agents
  spawner = AgentSpawner(f"127.0.0.1:{port}", hosts=2, timeout_s=120)
  assert [a["slots"] for a in spawner.agents] == [3, 3]
  try:
    engine = _serve(ProcessRuntime(spawner), "kill:ew1@step=4,layer=1; hang:aw1@step=7")
    _check(engine)
    declared = {ev["worker"] for ev in engine.timeline.of("declared_failed")}
    assert declared == {"ew1", "aw1"}
    # 2 AW + 2 EW, then the two replacements, each started by one of the two agents
    assert len(engine.runtime.workers) == 6
    assert {w.child.where.split()[1] for w in engine.runtime.workers} == {"0", "1"}
  finally:
    spawner.close()
  for p in procs:
    assert p.wait(timeout=30) == 0  # told to exit, they exit cleanly


def test_worker_processes_are_children_of_their_agent(agents):
  port, procs = agents
  spawner = AgentSpawner(f"127.0.0.1:{port}", hosts=2, timeout_s=120)
  try:
    start = Bound(120.0, "test")  # a bound on a hung start, far above what one takes
    children = [spawner.spawn(slot, "", start) for slot in spawner.slots]
    for child in children:
      child.ready()
    agent_pids = {p.pid for p in procs}
    parents = [_parent(c.pid) for c in children]
    assert set(parents) == agent_pids and parents.count(parents[0]) == 3
    children[0].stop()  # SIGKILL through the agent
    with pytest.raises(FileNotFoundError):
      _parent(children[0].pid)
    # The agent tells a dead worker from a live one: a wait on the dead one can end at once.
    children[1].signal(signal.SIGKILL)
    deadline = time.perf_counter() + 60.0  # a bound on a hung test
    while children[1].gone() is None and time.perf_counter() < deadline:
      time.sleep(0.01)
    assert "SIGKILL" in children[1].gone() and children[2].gone() is None
  finally:
    spawner.close()


@pytest.mark.parametrize("bad", ["7000", "head:", "head:port", "head:70000"])
def test_bad_orchestrator_addresses_are_named(bad):
  with pytest.raises(ValueError, match="HOST:PORT"):
    split_address(bad)


def test_an_agent_with_an_unknown_platform_is_refused():
  out = subprocess.run([sys.executable, "-m", "tarragon_jax.launch", "--orchestrator=h:1",
                        "--platform=tpu9"], capture_output=True, text=True, timeout=60)
  assert out.returncode != 0 and "platform" in out.stderr
