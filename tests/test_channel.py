"""Wire format and ZeroMQ channels, including a real peer process that is killed and stopped."""

import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from tarragon_jax.runtime import wire
from tarragon_jax.runtime.channel import Connection, Endpoint

PROBE_S = 0.01

# A peer process: echoes every request (arrays doubled) until it is killed.
PEER = """
import sys
from tarragon_jax.runtime.channel import Endpoint
e = Endpoint()
print(e.address, e.probe_address, flush=True)
while True:
  r = e.recv()
  m = r.message
  e.reply(r, {"echo": m, "doubled": [2 * a for a in m.get("arrays", [])]})
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
  start = time.perf_counter()
  assert c.call({"i": 3}, timeout_s=0.05) is None  # nobody serves: late, not an error
  assert 0.04 < time.perf_counter() - start < 0.5
  assert c.probe(1.0)  # libzmq answers heartbeats even while nobody serves requests
  c.close()
  e.close()


@pytest.fixture
def peer():
  proc = subprocess.Popen([sys.executable, "-c", PEER], stdout=subprocess.PIPE, text=True)
  address, probe_address = proc.stdout.readline().split()
  yield proc, Connection(address, probe_address, heartbeat_s=PROBE_S / 2,
                         heartbeat_timeout_s=PROBE_S)
  proc.kill()
  proc.wait()


def _until_silent(c: Connection) -> float:
  """Seconds until probes fail (a probe waits up to PROBE_S for the peer)."""
  start = time.perf_counter()
  while c.probe(PROBE_S):
    assert time.perf_counter() - start < 2.0, "the peer still answers heartbeats"
  return time.perf_counter() - start


def test_a_killed_peer_stops_answering_probes_at_once(peer):
  proc, c = peer
  x = np.random.default_rng(0).standard_normal(32768).astype(np.float32)  # 128 KiB
  out = c.call({"arrays": [x]}, timeout_s=10.0)
  np.testing.assert_array_equal(out["doubled"][0], 2 * x)
  assert c.probe(1.0)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _until_silent(c) < 2 * PROBE_S + 0.02  # the connection is closed, not timed out
  assert c.call({"arrays": []}, timeout_s=PROBE_S) is None


def test_a_stopped_peer_misses_heartbeats_and_answers_again_when_continued(peer):
  proc, c = peer
  assert c.call({"arrays": []}, timeout_s=10.0) is not None
  proc.send_signal(signal.SIGSTOP)
  try:
    assert _until_silent(c) < 3 * PROBE_S + 0.03  # one heartbeat timeout, plus a probe
    assert c.call({"arrays": []}, timeout_s=PROBE_S) is None
  finally:
    proc.send_signal(signal.SIGCONT)
  assert c.probe(5.0)
  assert c.call({"arrays": []}, timeout_s=10.0) is not None


def test_bench_transport_measures_both_transports_and_detection(tmp_path):
  from test_serve_launcher import _run

  from tarragon_jax import launch_config

  out = _run("experiments.bench_transport", "--config=configs/bench_transport.py",
             f"--workdir={tmp_path}", "--config.reps=20")
  records = {r["measure"]: r for r in launch_config.read_jsonl(tmp_path / "results.jsonl")}
  assert records["zmq empty request round trip"]["median_ms"] > 0
  assert records["zmq 128 KiB array round trip"]["median_ms"] > 0
  assert records["pipe 128 KiB array round trip"]["median_ms"] > 0
  for name in ("stopped", "killed"):
    assert 0.01 <= records[f"zmq: {name} peer found silent"]["seconds"] < 1.0, out
