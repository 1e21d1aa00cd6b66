"""Worker processes as Ray actors on a 2-node Ray cluster (`runtime/ray_spawner.py`): serving
through an EW kill and an AW kill, and through the loss of a whole node (all its workers and
spares at once) while the other node's workers keep decoding; tokens identical to the local
runtime's fault-free run, each index delivered once. Ray registers nodes under the host's
network address, so the cluster runs in a network namespace of its own with only loopback up
(`unshare -n`, root); it is started and shut down through its API, never `ray stop`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_cluster_scenarios.py")
ROOT = os.path.dirname(os.path.dirname(SCENARIOS))
BOUND_S = 900.0  # a bound on a hung run, far above the ~2 minutes it takes on 2 busy cores


def _can_unshare() -> bool:
  return (shutil.which("unshare") is not None and shutil.which("ip") is not None
          and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0)


@pytest.fixture(scope="module")
def ray_runs():
  if not _can_unshare():
    if os.environ.get("CI"):
      pytest.fail("CI must run the Ray tests: `unshare -n` (root) is not available here")
    pytest.skip("needs `unshare -n` (root) to keep the Ray cluster on loopback")
  pytest.importorskip("ray")
  cmd = (f"ip link set lo up && exec {sys.executable} {SCENARIOS} "
         "'kill:ew1@step=4,layer=1; kill:aw1@step=7; kill:store@step=9' "
         "'kill:node0@step=5,layer=1'")
  out = subprocess.run(["unshare", "-n", "sh", "-c", cmd], capture_output=True, text=True,
                       timeout=BOUND_S, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                           filter(None, [ROOT, os.environ.get("PYTHONPATH")]))))
  assert out.returncode == 0, out.stderr[-4000:]
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_slots_are_numbered_node_by_node(ray_runs):
  assert ray_runs[0] == {"nodes": [[0, 1, 2], [3, 4, 5]]}


def test_ew_aw_and_store_kills_on_ray_actors_give_the_fault_free_tokens(ray_runs):
  run = ray_runs[1]  # (its tokens and streams were checked in the cluster's process)
  assert run["declared"] == ["aw1", "ew1", "store"]
  assert run["workers_per_node"] == [3, 3]  # the replacements took node 1's spare slots
  assert run["stores"] == ["RayChild", "RayChild"]  # the standby actor took over


def test_losing_a_whole_node_loses_its_workers_at_once_and_the_other_node_serves_on(ray_runs):
  run = ray_runs[2]  # node 0 held aw0, aw1 and ew0: replaced on node 1, ew0 by its shadows
  assert run["declared"] == ["aw0", "aw1", "ew0"]
  assert run["workers_per_node"] == [3, 3]
  assert run["stores"] == ["RayChild"]  # (on the control plane's node: never lost with a node)


def test_rays_own_death_notice_agrees(ray_runs):
  notice = ray_runs[3]
  assert notice["before"] is None and "Ray actor died" in notice["after"]


def test_importing_the_library_does_not_import_ray():
  code = ("import sys, tarragon_jax, tarragon_jax.runtime.remote, tarragon_jax.serving.engine, "
          "experiments.launch_config; print('ray' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT)
  assert out.stdout.strip() == "False"
