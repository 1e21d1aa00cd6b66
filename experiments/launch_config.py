"""Launcher glue: ConfigDicts in, library objects and result files out.

`configs/*.py` describe a run as an `ml_collections.ConfigDict` with a `model` sub-dict that
mirrors `ModelConfig` field for field, plus launcher fields (seed, workdir, steps, ...).
Launchers take it with `define_flags`, turn it into a `ModelConfig` and an `EngineConfig`
here, and write their results (JSONL, summary.json, PNG) with the helpers here, so
every launcher's outputs look the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jaxlib
import ml_collections
from absl import flags, logging
from ml_collections import config_dict, config_flags

from tarragon_jax.config import ModelConfig
from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience.detector import DetectionConfig
from tarragon_jax.runtime.compile_cache import DEFAULT_COMPILE_CACHE, enable_compile_cache  # noqa: F401 (the launchers' flags)
from tarragon_jax.serving.engine_config import EngineConfig, ResilienceConfig


def model_dict(**fields) -> ml_collections.ConfigDict:
  """Every ModelConfig field as a ConfigDict: `fields`, ModelConfig's defaults for the rest.

  Listing every field means each one can be overridden on the command line
  (`--config.model.num_layers=4`); a None field becomes a typed placeholder so it can be set too.
  The values are validated by building a ModelConfig once.

  Raises:
    ValueError: a field is unknown or the combination is invalid (ModelConfig's message).
  """
  values = ModelConfig.from_dict(fields).to_dict()
  types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
  out = ml_collections.ConfigDict()
  for name, value in values.items():
    if value is None:
      value = config_dict.placeholder(int if "int" in str(types[name]) else str)
    out[name] = value
  return out


def define_flags(default_config: str, cache: bool = True,
                 required: tuple[str, ...] | None = None):
  """The flags every launcher takes: `--config` (a config file, fields overridable as
  `--config.field=value`; it must have the `required` fields, default: every field of
  `default_config`), `--workdir` (default: the config's `workdir`) and, with `cache`,
  `--compile_cache`. Returns their holders (config, workdir, compile_cache or None)."""
  # Progress and results go to stdout; absl's log (orbax's and JAX's INFO lines among it) shows
  # warnings and errors unless `--verbosity=0` asks for more. (Set as if given: `app.run` turns
  # a verbosity left at its default into INFO.)
  flags.FLAGS["verbosity"].value = logging.WARNING
  flags.FLAGS["verbosity"].using_default_value = False
  config = config_flags.DEFINE_config_file("config", default_config, "The run's config file.")
  flags.register_validator("config", _has_fields_of(default_config, required))
  workdir = flags.DEFINE_string("workdir", None, "Output directory; default: the config's "
                                "workdir.")
  compile_cache = flags.DEFINE_string(
      "compile_cache", DEFAULT_COMPILE_CACHE,
      "Persistent compilation cache directory ('' = off), for this process and every worker "
      "process; every policy of a comparison gets it.") if cache else None
  return config, workdir, compile_cache


def _has_fields_of(default_config: str, required: tuple[str, ...] | None):
  """A validator of `--config`: it must have the `required` top-level fields (default: every
  field of the launcher's own config), so that a model-shape config given to a serving launcher
  fails here, naming what it lacks, not later with an AttributeError."""
  def check(cd) -> bool:
    if required is None:
      spec = importlib.util.spec_from_file_location("_default_config", default_config)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
    missing = sorted(set(required or module.get_config().keys()) - set(cd.keys()))
    if missing:
      raise flags.ValidationError(
          f"--config lacks {', '.join(missing)}, which this launcher reads; give its own config "
          f"({default_config}) or one built from it (e.g. `c = {_module(default_config)}"
          f".get_config()`, then change fields)")
    return True

  return check


def _module(path: str) -> str:
  return os.path.splitext(path)[0].replace(os.sep, ".")


def engine_config(cd, *, resilience: dict | ResilienceConfig | None = None,
                  **overrides) -> EngineConfig:
  """The `EngineConfig` a launcher config (a ConfigDict, or a dict) describes.

  The plan from `num_aw`, `num_ew` (and `devices_per_aw` / `devices_per_ew`), `slots_per_aw`,
  and `shadows_per_expert` / `min_prefill_bucket` where the config has them; its
  `ResilienceConfig` from `recovery`, `snapshots`, `flush_interval_s`, `replace_failed` and
  `probe_interval_s` where it has them. `resilience` (ResilienceConfig fields, or a whole
  ResilienceConfig) and `overrides` (EngineConfig fields) win.
  """
  def given(*keys: str) -> dict:
    return {k: cd[k] for k in keys if k in cd}

  missing = [k for k in ("num_aw", "num_ew", "slots_per_aw") if k not in cd]
  if missing:
    raise ValueError(f"the config has no {', '.join(missing)}: it describes a model, not an "
                     f"engine (configs/tiny.py is a model shape); give this launcher its own "
                     f"config (configs/<launcher>_tiny.py), or add those fields")
  if not isinstance(resilience, ResilienceConfig):
    rc = given("recovery", "snapshots", "flush_interval_s", "replace_failed")
    if "probe_interval_s" in cd:
      rc["detection"] = DetectionConfig(probe_interval_s=cd["probe_interval_s"])
    resilience = ResilienceConfig(**(rc | (resilience or {})))
  fields = dict(plan=CellPlan(cd["num_aw"], cd["num_ew"],
                              **given("devices_per_aw", "devices_per_ew")),
                slots_per_aw=cd["slots_per_aw"],
                **given("shadows_per_expert", "min_prefill_bucket"),
                resilience=resilience)
  fields.update(overrides)
  return EngineConfig(**fields)


def model_config(cd: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig of a launcher config (its `model` sub-dict); ModelConfig validates it."""
  if "model" not in cd:
    raise ValueError("launcher config has no `model` sub-dict; see configs/tiny.py")
  return ModelConfig.from_dict(cd.model.to_dict())


def make_workdir(path: str) -> str:
  """Creates `path` (and parents) if needed; returns its absolute path."""
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  return path


def fresh_dir(path: str) -> str:
  """Empties or creates `path`: a launcher's own output directory, rewritten on every run."""
  if os.path.exists(path):
    shutil.rmtree(path)
  return make_workdir(path)


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> str:
  """Writes one JSON object per line (overwriting `path`); returns `path`."""
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps(record, sort_keys=True) + "\n")
  return path


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a file written by `write_jsonl`."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def progress(message: str, *args):
  """A launcher's progress line, on stdout as it happens (`message % args`, as logging takes)."""
  print(message % args if args else message, flush=True)


def provenance(cd=None) -> dict[str, Any]:
  """What produced a result: the commit (and whether the tree had changes), the jax / jaxlib
  versions, the devices, the runtime and the machine's cores."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args) -> str | None:
    try:
      return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None

  status = git("status", "--porcelain", "--untracked-files=no")
  devices = jax.devices()
  return {"commit": git("rev-parse", "HEAD"), "tree_modified": None if status is None
          else bool(status), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "device_count": len(devices),
          "runtime": "local" if cd is None else cd.get("runtime", "local"),
          "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}


def write_summary(workdir: str, summary: dict[str, Any], cd=None) -> str:
  """Writes `summary`, its provenance and the launcher config (when given) to
  `workdir`/summary.json."""
  record = dict(summary, provenance=provenance(cd))
  if cd is not None:
    record["config"] = json.loads(cd.to_json_best_effort())
  path = os.path.join(workdir, "summary.json")
  with open(path, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.write("\n")
  return path


def save_line_plot(path: str, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str,
                   title: str = "") -> str:
  """Saves a PNG with one line per `series` entry (label -> (xs, ys)); returns `path`."""
  import matplotlib

  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for label, (xs, ys) in series.items():
    ax.plot(xs, ys, label=label, marker="." if len(xs) <= 50 else None)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


RUNTIMES = ("local", "process", "ray")


def add_runtime_fields(c: ml_collections.ConfigDict, runtime: str = "local", slots: int = 8):
  """Adds the fields that choose where workers run (`make_runtime` reads them)."""
  # "local": every worker in this process on its own device cell; "process": every worker its
  # own OS process on this host (faults are SIGKILL / SIGSTOP; the baseline restarts every
  # process); "ray": worker processes as actors on the nodes of a Ray cluster (`ray_address`).
  c.runtime = runtime
  c.slots = slots  # process: worker processes on this host at once (one device each)
  c.platform = "cpu"  # process: the workers' JAX platform ("cuda", "tpu": one device each)
  c.devices = 0  # process: share this many local GPUs among the slots (0: one GPU per slot)
  c.transport = "zmq"  # process, ray: the data plane, "zmq" or "transfer" (jax pulls)
  c.weights_dir = ""  # ray: an orbax checkpoint every node can read ("" = a scratch copy)
  # ray: the cluster's address ("auto": the one this host joined with `ray start`), or "local":
  # a cluster of `ray_nodes` nodes of `slots` slots each, started for the run, in a network
  # namespace of its own with only loopback up (the launcher re-runs itself under `unshare -n`:
  # root); `ray_layout`: "pack" (slots node by node: AWs on the first node, as in the paper) or
  # "spread" (dealt out over the nodes: every node holds AWs and EWs).
  c.ray_address = "local"
  c.ray_nodes = 2
  c.ray_layout = "spread"


def make_runtime(cd: ml_collections.ConfigDict, spawner, compile_cache: str):
  """The runtime of one engine: None (the local runtime) without a spawner, else a
  `ProcessRuntime` on it with the config's transport."""
  from tarragon_jax.runtime.remote import ProcessRuntime

  if spawner is None:
    return None
  return ProcessRuntime(spawner, compile_cache, transport=cd.get("transport", "zmq"))


def make_spawner(cd: ml_collections.ConfigDict):
  """What starts worker processes for a launcher config: None for the local runtime. One
  spawner serves every engine of a run (`ProcessRuntime(spawner, cache)` each); close it at the
  end (a Ray cluster it started shuts down then)."""
  from tarragon_jax.runtime.spawner import LocalSpawner

  if cd.runtime not in RUNTIMES:
    raise ValueError(f"runtime={cd.runtime!r}; use one of {RUNTIMES}")
  if cd.runtime == "local":
    return None
  if cd.runtime == "process":
    return LocalSpawner(cd.slots, cd.platform, devices=cd.devices)
  from tarragon_jax.runtime.ray_spawner import RaySpawner  # (Ray only where it is asked for)

  if cd.ray_address == "local":
    return RaySpawner.local_cluster(cd.ray_nodes, cd.slots, cd.ray_layout)
  return RaySpawner(cd.ray_address, cd.platform, cd.ray_layout)


_NETNS = "TARRAGON_JAX_LOOPBACK_NETNS"


def isolate_network(cd: ml_collections.ConfigDict):
  """For a local Ray cluster (runtime "ray", ray_address "local"): re-runs this launcher, same
  arguments, in a network namespace of its own with only loopback up (Ray registers its nodes
  under the host's address otherwise); returns at once for anything else, and in the re-run.

  Raises:
    RuntimeError: the namespace cannot be made (`unshare -n` needs root).
  """
  if cd.runtime != "ray" or cd.ray_address != "local" or os.environ.get(_NETNS):
    return
  if shutil.which("unshare") is None or subprocess.run(
      ["unshare", "-n", "true"], capture_output=True).returncode != 0:
    raise RuntimeError("runtime=ray with ray_address=local starts a Ray cluster in a network "
                       "namespace of its own (`unshare -n`, as root), which is not possible "
                       "here: run as root, or start a cluster with `ray start` and pass "
                       "--config.ray_address=auto")
  sys.stdout.flush()
  command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.orig_argv[1:]])
  os.execvpe("unshare", ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {command}"],
             dict(os.environ, **{_NETNS: "1"}))


# A CPU burner: it stops by itself when its parent is gone or after `argv[1]` seconds, so that a
# launcher killed outright leaves no load behind.
_BURNER = """import os, sys, time
parent, end = os.getppid(), time.monotonic() + float(sys.argv[1])
while os.getppid() == parent and time.monotonic() < end:
  sum(i * i for i in range(10000))
"""


@contextlib.contextmanager
def cpu_burners(n: int, limit_s: float) -> Iterator[list[subprocess.Popen]]:
  """`n` CPU-burner processes (load beside a measurement) for the duration of the block, each
  stopping by itself after `limit_s` at the latest."""
  procs = [subprocess.Popen([sys.executable, "-c", _BURNER, str(limit_s)]) for _ in range(n)]
  try:
    yield procs
  finally:
    for p in procs:
      p.kill()
      p.wait()
