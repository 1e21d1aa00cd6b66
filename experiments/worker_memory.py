"""What loading its weights costs a worker process: its part only, against the whole model cut.

  python -m experiments.worker_memory --config=configs/worker_memory.py

Saves the config's model as an orbax checkpoint, then, each in a fresh process with one CPU
device, loads onto that device the weights of one AW and of each EW of the placement: "part"
reads only what the worker serves (`load_worker_weights`, as worker processes do), "whole"
restores the whole model and cuts the part from it (the comparator: how worker processes
loaded before). On CPU the device's memory is the process's, so each record is the process's
peak resident memory over a process that loaded nothing. Prints a table and the whole / part
ratios; writes results.jsonl (one record per worker, way and repetition) and summary.json.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import jax
import numpy as np
from absl import app

import tarragon_jax as tj
from experiments import launch_config
from tarragon_jax.layers.params import slot_experts, without_experts
from tarragon_jax.worker.placement import place

_CONFIG, _WORKDIR, _ = launch_config.define_flags("configs/worker_memory.py", cache=False)
WAYS = ("none", "part", "whole")


def _load(directory: str, way: str, contents) -> float:
  """In a fresh process: loads a worker's weights onto its device `way`; its peak RSS (MiB)."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # noqa: PLC0415 - this process's own runtime

  from tarragon_jax.checkpoint import checkpoint_config, load_checkpoint  # noqa: PLC0415
  from tarragon_jax.weights_source import load_worker_weights  # noqa: PLC0415

  jax.devices()  # (the runtime itself, in every way's figure)
  if way == "part":
    weights = jax.device_put(load_worker_weights(directory, checkpoint_config(directory),
                                                 contents))
  elif way == "whole":
    _, params = load_checkpoint(directory)
    weights = without_experts(params) if contents is None else slot_experts(
        params.layers.moe.experts, contents)
    del params
  if way != "none":
    jax.block_until_ready(weights)
  with open("/proc/self/status") as f:  # (this process's peak since its exec; ru_maxrss
    # would count the parent's memory at the fork)
    return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main(argv):
  del argv
  cd = _CONFIG.value
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  cfg = launch_config.model_config(cd)
  params = tj.init_params(cfg, jax.random.key(cd.seed))
  directory = os.path.join(workdir, "weights")
  tj.save_checkpoint(launch_config.fresh_dir(directory), params, cfg)
  placement = place(cfg.num_layers, cfg.num_experts, cd.num_ew,
                    shadows_per_expert=cd.shadows_per_expert)
  workers = [("aw", None)] + [(f"ew{m}", placement.contents[:, m]) for m in range(cd.num_ew)]
  mib = lambda tree: sum(a.nbytes for a in jax.tree.leaves(tree)) / 2**20  # noqa: E731
  model_mib = mib(params)
  part_mib = {"aw": model_mib - mib(params.layers.moe.experts)}
  for name, contents in workers[1:]:
    part_mib[name] = mib(slot_experts(params.layers.moe.experts, contents))
  del params
  ctx = mp.get_context("spawn")
  records = []
  with ctx.Pool(1, maxtasksperchild=1) as pool:  # a fresh process per load
    for rep in range(cd.reps):
      bare = pool.apply(_load, (directory, "none", None))
      for name, contents in workers:
        for way in WAYS[1:] if rep % 2 == 0 else WAYS[:0:-1]:
          peak = pool.apply(_load, (directory, way, contents))
          records.append(dict(worker=name, way=way, rep=rep, peak_mib=peak, bare_mib=bare,
                              loaded_mib=peak - bare, part_mib=part_mib[name],
                              model_mib=model_mib))
      launch_config.progress("rep %d/%d done", rep + 1, cd.reps)
  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  summary = _report(records, workers, model_mib)
  launch_config.write_summary(workdir, summary, cd)
  print(f"-> {workdir}")


def _report(records: list[dict], workers, model_mib: float) -> dict:
  print(f"model {model_mib:.0f} MiB; a worker process's peak memory over one that loaded nothing "
        f"(median of {max(r['rep'] for r in records) + 1}):")
  print(f"{'worker':<8}{'its part':>10}{'part':>10}{'whole':>10}{'whole / part':>14}")
  out = {}
  for name, _ in workers:
    med = {way: float(np.median([r["loaded_mib"] for r in records
                                 if r["worker"] == name and r["way"] == way]))
           for way in WAYS[1:]}
    part = next(r["part_mib"] for r in records if r["worker"] == name)
    out[name] = dict(part_mib=part, loaded_part_mib=med["part"], loaded_whole_mib=med["whole"],
                     whole_over_part=med["whole"] / med["part"])
    print(f"{name:<8}{part:>9.0f}M{med['part']:>9.0f}M{med['whole']:>9.0f}M"
          f"{out[name]['whole_over_part']:>13.1f}x")
  return dict(model_mib=model_mib, workers=out)


if __name__ == "__main__":
  app.run(main)
