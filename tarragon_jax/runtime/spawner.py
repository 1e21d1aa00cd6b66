"""Starting worker processes: on this host, or on other hosts through their agents.

A spawner turns a slot (one device) into a running `tarragon_jax.runtime.host` process and
hands back a child handle: `ready()` waits for the process to bind its endpoint and returns its
addresses, `signal(sig)` is how faults and fencing reach it (SIGKILL, SIGSTOP). Spawning and
waiting are separate so that many processes start side by side.

- `LocalSpawner`: every process on this host, as a child of this process.
- `AgentSpawner` (`cluster.py`): processes on the hosts whose agents registered
  (`tarragon_jax.launch`); the agent is the parent of its host's workers and delivers their
  signals.

On a GPU host a slot is one GPU: the process sees only it (`CUDA_VISIBLE_DEVICES`); on CPU a
slot is one process with one CPU device.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

WORKER = (sys.executable, "-m", "tarragon_jax.runtime.host")
PLATFORMS = ("cpu", "cuda", "gpu", "rocm")


class SpawnError(RuntimeError):
  """A worker process did not start."""


def worker_env(platform: str, device: int | None, shared: bool = False) -> dict:
  """The environment of a worker process on `platform` that owns local `device` (or none);
  `shared`: other processes use that device too (no up-front memory grab)."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r}; use one of {PLATFORMS}")
  env = dict(os.environ, JAX_PLATFORMS=platform)
  if device is not None and platform != "cpu":
    env["CUDA_VISIBLE_DEVICES" if platform != "rocm" else "HIP_VISIBLE_DEVICES"] = str(device)
    if shared:
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return env


class Child:
  """A worker process started by this process."""

  def __init__(self, compile_cache: str, host: str, platform: str, device: int | None,
               shared: bool = False):
    self.proc = subprocess.Popen(
        [*WORKER, f"--compile_cache={compile_cache}", f"--host={host}"],
        stdout=subprocess.PIPE, text=True, env=worker_env(platform, device, shared))
    self.pid = self.proc.pid

  def ready(self) -> tuple[str, str]:
    """Waits for the process to bind; its (request address, probe address)."""
    line = self.proc.stdout.readline().split()
    if len(line) != 3 or line[0] != "READY":
      raise SpawnError(f"worker process {self.pid} did not start (exit code "
                       f"{self.proc.poll()}, said {line})")
    return line[1], line[2]

  def alive(self) -> bool:
    return self.proc.poll() is None

  def signal(self, sig: int):
    if self.proc.poll() is None:
      self.proc.send_signal(sig)
      if sig == signal.SIGKILL:
        self.proc.wait()

  def stop(self):
    self.signal(signal.SIGKILL)


class LocalSpawner:
  """Worker processes on this host, `slots` of them at once at most.

  Slot i is local device i; with `devices` > 0 (fewer accelerators than slots, e.g. a check on
  a one-GPU host) slot i is device i % devices, shared with the other slots on it.
  """

  def __init__(self, slots: int = 8, platform: str = "cpu", host: str = "127.0.0.1",
               devices: int = 0):
    worker_env(platform, None)  # validates
    if devices < 0:
      raise ValueError(f"devices={devices}: the number of local accelerators to share (> 0), "
                       f"or 0 for one per slot")
    self.platform, self.host, self.devices = platform, host, devices
    self.slots = list(range(slots))

  def spawn(self, slot: int | None, compile_cache: str) -> Child:
    """A process for `slot` (None: a process without a device of its own, e.g. the store)."""
    if slot is not None and self.devices:
      return Child(compile_cache, self.host, self.platform, slot % self.devices,
                   shared=len(self.slots) > self.devices)
    return Child(compile_cache, self.host, self.platform, slot)

  def close(self):
    pass
