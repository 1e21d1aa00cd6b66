"""Wire format and ZeroMQ channels, including a real peer process that is killed and stopped."""

import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from tarragon_jax.runtime import wire
from tarragon_jax.runtime.channel import Bound, Connection, Endpoint, Pending
from tarragon_jax.worker.fault_domain import WorkerDead

PROBE_S = 0.01

# A peer process: echoes every request (and its arrays doubled) until it is killed.
PEER = """
import sys
from tarragon_jax.runtime.channel import Endpoint
e = Endpoint()
print(e.address, e.probe_address, flush=True)
while True:
  r = e.recv()
  m = r.message
  e.reply(r, {"result": m, "doubled": [2 * a for a in m.get("arrays", [])]})
"""


def test_wire_round_trips_nested_messages_and_arrays_without_copying_them():
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  b = np.array([1, 2], dtype=ml_dtypes.bfloat16)
  msg = {"op": "call", "args": [1, 2.5, None, True, "x", (3, [a, b])], "n": np.int32(7)}
  frames = wire.encode(msg)
  assert len(frames) == 3 and len(frames[0]) < 300  # arrays travel outside the header
  out = wire.decode(frames)
  assert out["op"] == "call" and out["n"] == 7 and out["args"][:5] == [1, 2.5, None, True, "x"]
  t = out["args"][5]
  assert isinstance(t, tuple) and t[0] == 3
  np.testing.assert_array_equal(t[1][0], a)
  assert t[1][1].dtype == ml_dtypes.bfloat16 and list(t[1][1].astype(np.float32)) == [1, 2]
  assert np.shares_memory(t[1][0], frames[1])  # a view of the frame, not a copy


@pytest.mark.parametrize("bad, match", [({1: 2}, "dict keys"), ({"__array__": 1}, "dict keys"),
                                        (object(), "cannot send a object")])
def test_wire_refuses_what_cannot_travel(bad, match):
  with pytest.raises(TypeError, match=match):
    wire.encode(bad)


def test_requests_and_replies_in_process():
  e = Endpoint()
  c = Connection(e.address, e.probe_address)
  first, second = c.send({"i": 1}), c.send({"i": 2})
  for _ in range(2):
    r = e.recv(timeout_s=1.0)
    e.reply(r, {"got": r.message["i"]})
  assert c.result(second, 1.0) == {"got": 2}  # replies are matched to requests by id
  assert c.result(first, 1.0) == {"got": 1}
  assert c.call({"i": 3}, timeout_s=0.05) is None  # nobody serves: late, not an error
  assert c.probe(1.0)  # libzmq answers heartbeats even while nobody serves requests
  c.close()
  e.close()


def _start_peer():
  proc = subprocess.Popen([sys.executable, "-c", PEER], stdout=subprocess.PIPE, text=True)
  address, probe_address = proc.stdout.readline().split()
  return proc, Connection(address, probe_address, heartbeat_s=PROBE_S / 2,
                          heartbeat_timeout_s=PROBE_S)


@pytest.fixture
def peers():
  """Two echo peers: the test signals the first; the second stays up as the control."""
  started = [_start_peer(), _start_peer()]
  yield started
  for proc, c in started:
    proc.kill()
    proc.wait()
    c.close()


def _until_silent(c: Connection, bound_s: float = 60.0) -> bool:
  """Probes until one fails; False if the peer still answers after `bound_s` (a bound on a hung
  test, far above what detection takes)."""
  deadline = time.perf_counter() + bound_s
  while c.probe(PROBE_S):
    if time.perf_counter() > deadline:
      return False
  return True


def _pending(proc, c: Connection, message, bound_s: float = 60.0) -> Pending:
  def gone():
    code = proc.poll()
    return None if code is None else f"exited with code {code}"
  return Pending(c, c.send(message), "echo", f"peer{proc.pid}",
                 Bound(bound_s, "test.bound_s"), gone, slice_s=PROBE_S)


def test_a_killed_peer_stops_answering_probes_and_a_wait_on_it_ends_at_once(peers):
  (proc, c), (_, control) = peers
  x = np.random.default_rng(0).standard_normal(32768).astype(np.float32)  # 128 KiB
  out = c.call({"arrays": [x]}, timeout_s=10.0)
  np.testing.assert_array_equal(out["doubled"][0], 2 * x)
  assert c.probe(1.0) and control.probe(1.0)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _until_silent(c)  # the connection is closed, not timed out
  assert c.disconnected()  # and its port refuses: the peer is gone, not slow
  assert control.probe(1.0) and not control.disconnected()
  assert c.call({"arrays": []}, timeout_s=PROBE_S) is None
  # A wait on the dead peer ends with WorkerDead naming it, long before its (1 h) bound.
  with pytest.raises(WorkerDead, match=f"peer{proc.pid}.*exited with code -9"):
    _pending(proc, c, {"arrays": []}, bound_s=3600.0).result()


def test_a_stopped_peer_misses_heartbeats_and_answers_again_when_continued(peers):
  (proc, c), (control_proc, control) = peers
  assert c.call({"arrays": []}, timeout_s=10.0) is not None
  proc.send_signal(signal.SIGSTOP)
  try:
    assert _until_silent(c)  # missed heartbeats drop the probe connection
    assert control.probe(1.0)  # while the live peer's stays up
    assert not c.disconnected()  # stopped is silent, not gone: its kernel still accepts
    assert c.call({"arrays": []}, timeout_s=PROBE_S) is None
    # A wait on it ends at its bound, with an error naming the peer, the call and the bound.
    with pytest.raises(TimeoutError, match=rf"peer{proc.pid}.*0\.2 s \(set by test\.bound_s\)"):
      _pending(proc, c, {"arrays": []}, bound_s=0.2).result()
    assert _pending(control_proc, control, {"arrays": []}).result() == {"arrays": []}
  finally:
    proc.send_signal(signal.SIGCONT)
  assert c.probe(5.0)
  assert c.call({"arrays": []}, timeout_s=10.0) is not None


def test_pending_returns_a_reply_that_came_before_its_peer_died(peers):
  (proc, c), _ = peers
  pending = _pending(proc, c, {"arrays": []})
  assert c.probe(5.0)
  deadline = time.perf_counter() + 60.0  # a bound on a hung test
  while not c._sock.poll(10) and time.perf_counter() < deadline:  # the reply is in
    pass
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert pending.result() == {"arrays": []}  # a reply, not WorkerDead
  with pytest.raises(WorkerDead):
    _pending(proc, c, {"arrays": []}).result()


def test_bench_transport_measures_both_transports_and_detection(tmp_path):
  from test_serve_launcher import _run

  from experiments import launch_config

  out = _run("experiments.bench_transport", "--config=configs/bench_transport.py",
             f"--workdir={tmp_path}", "--config.reps=20")
  records = {r["measure"]: r for r in launch_config.read_jsonl(tmp_path / "results.jsonl")}
  assert records["zmq empty request round trip"]["median_ms"] > 0
  assert records["zmq 128 KiB array round trip"]["median_ms"] > 0
  assert records["pipe 128 KiB array round trip"]["median_ms"] > 0
  for name in ("stopped", "killed"):  # measured there; how fast is the benchmark's business
    assert records[f"zmq: {name} peer found silent"]["seconds"] > 0, out
