"""Serving on a 2-node Ray cluster started here, in the network namespace the test made
(`test_ray_runtime.py` runs this file; every byte stays on loopback). Prints one JSON line of
results per scenario."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_process_runtime import _check, _serve  # noqa: E402

from tarragon_jax.runtime.channel import Bound  # noqa: E402
from tarragon_jax.runtime.ray_spawner import SLOT_RESOURCE, RaySpawner  # noqa: E402
from tarragon_jax.runtime.remote import ProcessRuntime  # noqa: E402
from tarragon_jax.runtime.spawner import ProcessStat  # noqa: E402

BOUND_S = 120.0  # a bound on a hung test, far above what anything here takes


def _serve_through(spawner, faults: str) -> dict:
  # A bound on a hung start, not a measure: under CI load an actor (Ray, then JAX) took > 60 s.
  engine = _serve(ProcessRuntime(spawner), faults, start_timeout_s=BOUND_S)
  _check(engine)  # tokens identical to the local runtime's fault-free run, each index once
  nodes = spawner.nodes()
  return dict(faults=faults,
              declared=sorted(ev["worker"] for ev in engine.timeline.of("declared_failed")),
              workers_per_node=[sum(w.cell.devices[0] in n for w in engine.runtime.workers)
                                for n in nodes],
              stores=[type(s.child).__name__ for s in engine.runtime.stores])


def _ray_notice_agrees(spawner) -> dict:
  """A killed actor seen as a worker on another host would be: by Ray's notice alone."""
  child = spawner.spawn(spawner.slots[-1], "", Bound(BOUND_S, "test"))
  child.ready()
  child._stat = ProcessStat(None)  # (as if its node were another host: no /proc to read)
  before = child.gone()
  os.kill(child.pid, signal.SIGKILL)
  deadline = time.perf_counter() + BOUND_S
  while child.gone() is None and time.perf_counter() < deadline:
    time.sleep(0.01)
  return dict(before=before, after=child.gone())


def main():
  cluster = Cluster(initialize_head=True,
                    head_node_args={"num_cpus": 1, "resources": {SLOT_RESOURCE: 3}})
  cluster.add_node(num_cpus=1, resources={SLOT_RESOURCE: 3})
  ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
  try:
    spawner = RaySpawner(None)
    print(json.dumps(dict(nodes=spawner.nodes())), flush=True)
    for faults in sys.argv[1:]:
      print(json.dumps(_serve_through(spawner, faults)), flush=True)
    print(json.dumps(_ray_notice_agrees(spawner)), flush=True)
  finally:
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
  main()
