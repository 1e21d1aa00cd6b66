"""Starting worker processes: on this host, or as Ray actors on a cluster's nodes.

A spawner turns a slot (one device) into a running `tarragon_jax.runtime.host` process and
hands back a child handle: `ready()` waits for the process to bind its endpoint and returns its
addresses (at most the start bound given to `spawn`, and not at all once the process has
exited), `gone()` says whether and how the process ended, `signal(sig)` is how faults and
fencing reach it (SIGKILL, SIGSTOP). Spawning and waiting are separate so that many processes
start side by side.

- `LocalSpawner`: every process on this host, as a child of this process.
- `RaySpawner` (`ray_spawner.py`): actors on the nodes of a Ray cluster; signals go to the
  actor's process.

On an accelerator host a slot is one device, and the process sees only it: slot i is the i-th
device this process may use (under `CUDA_VISIBLE_DEVICES=4,5,6,7`, slot 0 is GPU 4; on TPU, the
i-th of `TPU_VISIBLE_CHIPS`). On CPU a slot is one process with one CPU device.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

from tarragon_jax.runtime.channel import Bound

WORKER = (sys.executable, "-m", "tarragon_jax.runtime.host")
# The variable through which each platform's runtime is told which of the host's devices a
# process may use. On TPU it names chips; a chip belongs to one process at a time.
VISIBLE = {"cuda": "CUDA_VISIBLE_DEVICES", "gpu": "CUDA_VISIBLE_DEVICES",
           "rocm": "HIP_VISIBLE_DEVICES", "tpu": "TPU_VISIBLE_CHIPS"}
PLATFORMS = ("cpu", *VISIBLE)
_TPU_PORT0 = 8476  # libtpu's mesh controller port; each single-chip process needs its own
_SLICE_S = 0.05  # how often a wait for READY checks that the process still runs
_REAP_S = 5.0  # the longest wait for a SIGKILLed (or closing) child to be reaped
_PF_EXITING = 0x4  # linux/sched.h: the task is getting shut down


class SpawnError(RuntimeError):
  """A worker process did not start."""


def visible_devices(platform: str, environ=None) -> list[str] | None:
  """The devices this process may use on `platform`, as its scheduler named them (e.g. ["4",
  "5"] under CUDA_VISIBLE_DEVICES=4,5; GPU UUIDs stay as they are); None: every device."""
  environ = os.environ if environ is None else environ
  names = [VISIBLE[platform]] + (["TPU_VISIBLE_DEVICES"] if platform == "tpu" else [])
  for name in names:
    if environ.get(name) is not None:
      return [d.strip() for d in environ[name].split(",") if d.strip()]
  return None


def tpu_chip_env(chip: str) -> dict:
  """What a process that owns TPU chip `chip` alone needs: libtpu sees that chip only, as a
  one-chip topology of one process (no process talks to another through libtpu: arrays travel
  on our data plane), with a mesh controller port of its own."""
  port = str(_TPU_PORT0 + int(chip))
  return dict(TPU_VISIBLE_CHIPS=chip, TPU_VISIBLE_DEVICES=chip,
              TPU_CHIPS_PER_PROCESS_BOUNDS="1,1,1", TPU_PROCESS_BOUNDS="1,1,1",
              TPU_MESH_CONTROLLER_ADDRESS=f"localhost:{port}", TPU_MESH_CONTROLLER_PORT=port)


def worker_env(platform: str, device: int | None, shared: bool = False,
               environ=None) -> dict:
  """The environment of a worker process on `platform` that owns the `device`-th device this
  process may use (or none); `shared`: other processes use that device too (no up-front
  memory grab). `environ`: this process's environment (default `os.environ`).

  Raises:
    ValueError: an unknown platform, a device this process may not use, or a shared TPU chip.
  """
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r}; use one of {PLATFORMS}")
  environ = os.environ if environ is None else environ
  env = dict(environ, JAX_PLATFORMS=platform)
  if device is None or platform == "cpu":
    return env
  visible = visible_devices(platform, environ)
  if visible is None:
    name = str(device)
  elif device < len(visible):
    name = visible[device]
  else:
    raise ValueError(f"device {device} of platform {platform!r}: this process may use only "
                     f"{len(visible)} ({VISIBLE[platform]}={environ.get(VISIBLE[platform])!r}); "
                     f"ask for at most {len(visible)} slots or devices")
  env[VISIBLE[platform]] = name
  if platform == "tpu":
    if shared:
      raise ValueError("a TPU chip belongs to one process at a time: give the TPU platform one "
                       "slot per chip (devices=0)")
    env.update(tpu_chip_env(name))
  elif shared:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return env


def describe_exit(code: int) -> str:
  """A process's exit status (`Popen.returncode`) in words, e.g. "its process was ended by
  SIGKILL (exit code -9)"."""
  if code < 0:
    try:
      return f"its process was ended by {signal.Signals(-code).name} (exit code {code})"
    except ValueError:
      pass
  return f"its process exited with code {code}"


class ProcessStat:
  """Whether a process of this host is exiting, read from its /proc/<pid>/stat (kept open, so
  that a reused pid is never read as this process)."""

  def __init__(self, pid: int | None):
    self._fd = -1
    if pid is not None:
      try:
        self._fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
      except OSError:
        pass

  def exiting(self) -> str | None:
    """How the process is ending, once the kernel has marked it as exiting (Linux; None
    elsewhere, and while it runs)."""
    if self._fd < 0:
      return None
    try:
      stat = os.pread(self._fd, 1024, 0)
    except OSError:  # (it has been reaped meanwhile)
      return None
    fields = stat[stat.rindex(b")") + 2:].split()  # from the 3rd field on, after "(comm)"
    if not int(fields[6]) & _PF_EXITING:  # the 9th: flags
      return None
    status = int(fields[49]) if len(fields) > 49 else 0  # the 52nd: waitpid's status
    if status & 0x7F:
      return describe_exit(-(status & 0x7F)) + " (it is exiting)"
    return "its process is exiting"

  def close(self):
    if self._fd >= 0:
      os.close(self._fd)
    self._fd = -1


class Child:
  """A worker process started by this process.

  `start` bounds the time from its start to its READY line (Python and JAX imported, endpoint
  bound); `proc.poll()` is certain evidence of its death, so `gone` and every wait use it.
  """

  def __init__(self, compile_cache: str, host: str, env: dict, start: Bound):
    """`env`: the process's environment (`worker_env`)."""
    self.proc = subprocess.Popen(
        [*WORKER, f"--compile_cache={compile_cache}", f"--host={host}"],
        stdout=subprocess.PIPE, text=True, env=env)
    self.pid = self.proc.pid
    self.start = start
    self._deadline = time.perf_counter() + start.seconds
    self._out = b""  # stdout read so far, until the READY line
    self._addresses: tuple[str, str] | None = None
    self._stat: ProcessStat | None = None  # for `gone`, once asked

  def ready(self) -> tuple[str, str]:
    """Waits for the process to bind; its (request address, probe address).

    Raises:
      SpawnError: it exited first (its exit code named), said something else, or was not
        ready within its start bound (a hung start: it is left running; `stop` it).
    """
    while True:
      addresses = self.started(min(_SLICE_S, max(0.0, self._deadline - time.perf_counter())))
      if addresses is not None:
        return addresses

  def started(self, wait_s: float = 0.0) -> tuple[str, str] | None:
    """Its addresses once it has said READY, else None after waiting up to `wait_s`.

    Raises:
      SpawnError: as `ready`.
    """
    if self._addresses is not None:
      return self._addresses
    fd = self.proc.stdout.fileno()
    if select.select([fd], [], [], wait_s)[0]:
      chunk = os.read(fd, 4096)
      self._out += chunk
      if not chunk and b"\n" not in self._out:  # stdout closed before READY: it is ending
        try:
          self.proc.wait(timeout=_REAP_S)
        except subprocess.TimeoutExpired:
          pass
        raise SpawnError(f"worker process {self.pid} closed its output without saying READY "
                         f"({self._exit()})")
    if b"\n" in self._out:
      line = self._out.split(b"\n", 1)[0].decode(errors="replace").split()
      if len(line) != 3 or line[0] != "READY":
        raise SpawnError(f"worker process {self.pid} did not start: it said {line} instead of "
                         f"READY ({self._exit()})")
      why = self.gone()  # a READY line outlives its process in the pipe
      if why is not None:
        raise SpawnError(f"worker process {self.pid} said READY, then died: {why}")
      self._addresses = (line[1], line[2])
      return self._addresses
    why = self.gone()
    if why is not None:
      raise SpawnError(f"worker process {self.pid} did not start: {why}")
    if time.perf_counter() >= self._deadline:
      raise SpawnError(f"worker process {self.pid} did not say READY within "
                       f"{self.start.seconds:g} s (set by {self.start.setting}); it is alive "
                       f"but stuck (or the host is overloaded)")
    return None

  def _exit(self) -> str:
    why = self.gone()
    return "it is still running" if why is None else why

  def gone(self) -> str | None:
    """None while the process runs (or is stopped), else how it ended, or that it is ending.

    A killed process is reaped only once the kernel has torn its memory down (tens of
    milliseconds for a JAX worker), and until then its ports still accept connections; but the
    kernel marks it as exiting (PF_EXITING) as soon as the signal is taken, and an exiting
    process never runs user code again: that is as certain as its exit status.
    """
    code = self.proc.poll()
    if code is not None:
      self._close_stat()
      return describe_exit(code)
    return self._exiting()

  def _exiting(self) -> str | None:
    if self._stat is None:
      self._stat = ProcessStat(self.pid)
    return self._stat.exiting()

  def _close_stat(self):
    if self._stat is not None:
      self._stat.close()
    self._stat = ProcessStat(None)

  def alive(self) -> bool:
    return self.proc.poll() is None

  def signal(self, sig: int):
    """Sends `sig` and returns at once. A SIGKILLed process takes tens of milliseconds to
    end (the kernel tears down its memory first): a failure injected into a serving process
    must not stall the injector meanwhile; the process's peers find it as they would any
    other death (its port refuses, its probes go unanswered)."""
    if self.proc.poll() is None:
      self.proc.send_signal(sig)

  def stop(self):
    """SIGKILL, then waits (up to a bound) for the process to be reaped."""
    self.signal(signal.SIGKILL)
    try:
      self.proc.wait(timeout=_REAP_S)
      self._close_stat()
    except subprocess.TimeoutExpired:  # the kernel holds it: `gone` sees it later
      pass


class LocalSpawner:
  """Worker processes on this host, `slots` of them at once at most.

  Slot i is local device i; with `devices` > 0 (fewer accelerators than slots, e.g. a check on
  a one-GPU host) slot i is device i % devices, shared with the other slots on it.
  """

  def __init__(self, slots: int = 8, platform: str = "cpu", host: str = "127.0.0.1",
               devices: int = 0):
    worker_env(platform, None)  # an unknown platform is refused even with no slots
    if devices < 0:
      raise ValueError(f"devices={devices}: the number of local accelerators to share (> 0), "
                       f"or 0 for one per slot")
    self.platform, self.host, self.devices = platform, host, devices
    self.slots = list(range(slots))
    for slot in self.slots:  # refuses now a device this process may not use, not mid-failover
      self._env(slot)

  def _env(self, slot: int) -> dict:
    if self.devices:
      return worker_env(self.platform, slot % self.devices, shared=len(self.slots) > self.devices)
    return worker_env(self.platform, slot)

  def spawn(self, slot: int | None, compile_cache: str, start: Bound) -> Child:
    """A process for `slot` (None: a process without a device of its own, e.g. the store),
    which must say READY within `start`."""
    # (the store: host arrays only, so no accelerator of its own)
    env = worker_env("cpu", None) if slot is None else self._env(slot)
    return Child(compile_cache, self.host, env, start)

  def nodes(self) -> list[list[int]]:
    """The slots of each node that can fail as a whole: none (one host, no node faults)."""
    return []

  def close(self):
    pass
