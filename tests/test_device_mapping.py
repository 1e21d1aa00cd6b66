"""Which device a worker process gets on an accelerator host, driven by a fake environment.

A scheduler hands this process some of the host's devices (`CUDA_VISIBLE_DEVICES=4,5,6,7`); a
worker's slot indexes those, never the host's.
"""

import pytest

from tarragon_jax.runtime.spawner import LocalSpawner, visible_devices, worker_env


def test_a_gpu_slot_is_the_slot_th_visible_device():
  parent = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
  assert [worker_env("cuda", i, environ=parent)["CUDA_VISIBLE_DEVICES"] for i in range(4)] == \
      ["4", "5", "6", "7"]
  assert worker_env("gpu", 1, environ=parent)["JAX_PLATFORMS"] == "gpu"
  uuids = {"CUDA_VISIBLE_DEVICES": "GPU-aa11, GPU-bb22"}
  assert worker_env("cuda", 1, environ=uuids)["CUDA_VISIBLE_DEVICES"] == "GPU-bb22"
  assert worker_env("cuda", 3, environ={})["CUDA_VISIBLE_DEVICES"] == "3"  # every GPU visible
  assert worker_env("rocm", 0, environ={"HIP_VISIBLE_DEVICES": "2,3"})["HIP_VISIBLE_DEVICES"] == "2"


def test_a_device_this_process_may_not_use_is_refused_naming_what_it_has():
  with pytest.raises(ValueError, match=r"device 4 .* only 4 \(CUDA_VISIBLE_DEVICES='4,5,6,7'\)"):
    worker_env("cuda", 4, environ={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
  with pytest.raises(ValueError, match="only 0"):
    worker_env("cuda", 0, environ={"CUDA_VISIBLE_DEVICES": ""})
  with pytest.raises(ValueError, match="platform='metal'"):
    worker_env("metal", 0, environ={})


def test_cpu_workers_and_deviceless_processes_get_no_device_variable():
  parent = {"CUDA_VISIBLE_DEVICES": "4,5"}
  assert worker_env("cpu", 3, environ=parent)["CUDA_VISIBLE_DEVICES"] == "4,5"  # untouched
  assert worker_env("cuda", None, environ=parent)["CUDA_VISIBLE_DEVICES"] == "4,5"


def test_a_shared_gpu_does_not_preallocate():
  env = worker_env("cuda", 0, shared=True, environ={"CUDA_VISIBLE_DEVICES": "6"})
  assert env["CUDA_VISIBLE_DEVICES"] == "6" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in worker_env("cuda", 0, environ={})


def test_a_tpu_worker_owns_one_chip_as_a_one_chip_topology_with_its_own_port():
  parent = {"TPU_VISIBLE_CHIPS": "2,3"}
  assert visible_devices("tpu", parent) == ["2", "3"]
  env = worker_env("tpu", 1, environ=parent)
  assert env["JAX_PLATFORMS"] == "tpu"
  assert env["TPU_VISIBLE_CHIPS"] == env["TPU_VISIBLE_DEVICES"] == "3"
  assert env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == env["TPU_PROCESS_BOUNDS"] == "1,1,1"
  ports = {worker_env("tpu", i, environ={})["TPU_MESH_CONTROLLER_PORT"] for i in range(4)}
  assert len(ports) == 4  # processes side by side on one host each need their own
  assert env["TPU_MESH_CONTROLLER_ADDRESS"] == f"localhost:{env['TPU_MESH_CONTROLLER_PORT']}"
  # the older name of the variable is read too
  assert worker_env("tpu", 0, environ={"TPU_VISIBLE_DEVICES": "5"})["TPU_VISIBLE_CHIPS"] == "5"
  with pytest.raises(ValueError, match="one process at a time"):
    worker_env("tpu", 0, shared=True, environ=parent)


def test_the_spawner_maps_slots_through_the_visible_devices(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
  spawner = LocalSpawner(slots=4, platform="cuda")
  assert [spawner._env(s)["CUDA_VISIBLE_DEVICES"] for s in spawner.slots] == ["4", "5", "6", "7"]
  shared = LocalSpawner(slots=8, platform="cuda", devices=2)  # 8 workers on GPUs 4 and 5
  assert [shared._env(s)["CUDA_VISIBLE_DEVICES"] for s in shared.slots] == ["4", "5"] * 4
  # more slots than visible GPUs is refused when the spawner is made, not mid-failover
  with pytest.raises(ValueError, match="device 4 of platform 'cuda'"):
    LocalSpawner(slots=8, platform="cuda")
  with pytest.raises(ValueError, match="one process at a time"):
    LocalSpawner(slots=4, platform="tpu", devices=1)
