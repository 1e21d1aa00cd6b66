"""Round trips between independent JAX processes: ZeroMQ channels vs multiprocessing pipes.

  python -m experiments.bench_transport --config=configs/bench_transport.py

A peer process with its own JAX runtime (one CPU device) answers: a request without arrays, and
an array round
trip (received, put on its device, computed on, fetched and sent back), over
`tarragon_jax.runtime.channel` (ZeroMQ, loopback TCP) and over a `multiprocessing` pipe. Then the
peer is stopped (SIGSTOP) and killed (SIGKILL) and the time until a probe with a
`probe_interval_s` timeout reports it silent is measured. Writes results.jsonl.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
from absl import app

from experiments import launch_config
from tarragon_jax.runtime.channel import Connection, Endpoint

_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags("configs/bench_transport.py")


def _jax_peer(cache: str):
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # noqa: PLC0415 - the peer's own runtime, after the platform is set

  launch_config.enable_compile_cache(cache)
  return jax


def _zmq_peer(ready, cache):
  jax = _jax_peer(cache)
  e = Endpoint()
  ready.send((e.address, e.probe_address))
  while True:
    r = e.recv()
    arrays = [np.asarray(jax.device_put(a) + 0) for a in r.message["arrays"]]
    e.reply(r, {"arrays": arrays})


def _pipe_peer(conn, cache):
  jax = _jax_peer(cache)
  conn.send("ready")
  while True:
    a = conn.recv()
    conn.send(np.asarray(jax.device_put(a) + 0))


def _timed(fn, reps: int) -> list[float]:
  out = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    out.append(time.perf_counter() - start)
  return out[reps // 10:]


def _record(name: str, seconds: list[float]) -> dict:
  r = dict(measure=name, median_ms=1e3 * float(np.median(seconds)),
           p95_ms=1e3 * float(np.percentile(seconds, 95)), n=len(seconds))
  print(f"{name:<40} median {r['median_ms']:7.3f} ms   p95 {r['p95_ms']:7.3f} ms")
  return r


def main(argv):
  del argv
  cd = _CONFIG.value
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  ctx = mp.get_context("spawn")
  x = np.random.default_rng(0).standard_normal(cd.array_kib * 256).astype(np.float32)
  records = []

  parent, child = ctx.Pipe()
  proc = ctx.Process(target=_zmq_peer, args=(child, _CACHE.value), daemon=True)
  proc.start()
  c = Connection(*parent.recv(), heartbeat_s=cd.probe_interval_s / 2,
                 heartbeat_timeout_s=cd.probe_interval_s)
  c.call({"arrays": [x]}, 60.0)  # the peer's first device_put compiles
  records.append(_record("zmq empty request round trip",
                         _timed(lambda: c.call({"arrays": []}, 10.0), cd.reps)))
  records.append(_record(f"zmq {cd.array_kib} KiB array round trip",
                         _timed(lambda: c.call({"arrays": [x]}, 10.0), cd.reps)))
  for sig, name in ((signal.SIGSTOP, "stopped"), (signal.SIGKILL, "killed")):
    os.kill(proc.pid, sig)
    start = time.perf_counter()
    while c.probe(cd.probe_interval_s):
      pass
    seconds = time.perf_counter() - start
    records.append(dict(measure=f"zmq: {name} peer found silent", seconds=seconds))
    print(f"zmq: {name} peer found silent after {seconds * 1e3:.1f} ms "
          f"(probe timeout {cd.probe_interval_s * 1e3:.0f} ms)")
  proc.join()

  parent, child = ctx.Pipe()
  proc = ctx.Process(target=_pipe_peer, args=(child, _CACHE.value), daemon=True)
  proc.start()
  parent.recv()

  def pipe_round_trip():
    parent.send(x)
    parent.recv()

  pipe_round_trip()
  records.append(_record(f"pipe {cd.array_kib} KiB array round trip",
                         _timed(pipe_round_trip, cd.reps)))
  proc.kill()
  proc.join()
  path = launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  print(f"-> {path}")


if __name__ == "__main__":
  app.run(main)
