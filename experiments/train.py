"""Trains a tiny MoE with optax on Python's stdlib sources (bytes) and checkpoints it with orbax.

  python -m experiments.train --config=configs/train_tiny.py

Writes to the config's workdir: metrics.jsonl (step, train_loss, eval_loss), loss.png,
summary.json and checkpoint/ (reloaded with `tarragon_jax.load_checkpoint` and checked).
Legend: B batch, T window length, V vocab.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

import tarragon_jax as tj
from experiments import launch_config
from tarragon_jax.training import adamw, eval_loss, make_train_step, stdlib_bytes, windows

_CONFIG, _WORKDIR, _ = launch_config.define_flags("configs/train_tiny.py", cache=False)


def main(argv):
  del argv
  cd = _CONFIG.value
  cfg = launch_config.model_config(cd)
  if cfg.vocab_size < 256:
    raise app.UsageError(f"byte-level corpus needs vocab_size >= 256, got {cfg.vocab_size}")
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  rng = np.random.default_rng(cd.seed)

  data = stdlib_bytes(cd.corpus_packages)
  split = int(len(data) * (1 - cd.eval_fraction))
  train_data, eval_data = data[:split], data[split:]
  n_eval = cd.eval_batches * cd.batch_size
  eval_set = jnp.asarray(windows(eval_data, rng.integers(0, len(eval_data) - cd.seq_len - 1,
                                                         n_eval), cd.seq_len))
  launch_config.progress("corpus %s: %d train bytes, %d held-out bytes (%d eval windows)",
                         cd.corpus_packages, len(train_data), len(eval_data), n_eval)

  params = tj.init_params(cfg, jax.random.key(cd.seed))
  opt = adamw(cfg, cd.learning_rate, cd.steps, cd.warmup_steps, cd.weight_decay, cd.grad_clip)
  state = opt.init(params)
  train_step = make_train_step(cfg, opt)

  records = [{"step": 0, "train_loss": None, "eval_loss": float(eval_loss(params, cfg, eval_set))}]
  launch_config.progress("step 0: eval_loss %.4f", records[0]["eval_loss"])
  train_losses = []
  start = time.perf_counter()
  for step in range(1, cd.steps + 1):
    batch = windows(train_data, rng.integers(0, len(train_data) - cd.seq_len - 1, cd.batch_size),
                    cd.seq_len)
    params, state, loss = train_step(params, state, jnp.asarray(batch))
    train_losses.append(loss)
    if step % cd.eval_every == 0 or step == cd.steps:
      train = float(np.mean(jax.device_get(train_losses[-cd.eval_every:])))
      records.append({"step": step, "train_loss": train,
                      "eval_loss": float(eval_loss(params, cfg, eval_set))})
      launch_config.progress("step %d: train_loss %.4f eval_loss %.4f (%.1f s)", step, train,
                             records[-1]["eval_loss"], time.perf_counter() - start)
  train_seconds = time.perf_counter() - start

  metrics = launch_config.write_jsonl(os.path.join(workdir, "metrics.jsonl"), records)
  plot = launch_config.save_line_plot(
      os.path.join(workdir, "loss.png"),
      {f"train (mean of {cd.eval_every} steps)": ([r["step"] for r in records[1:]],
                                               [r["train_loss"] for r in records[1:]]),
       "eval (held out)": ([r["step"] for r in records], [r["eval_loss"] for r in records])},
      xlabel="step", ylabel="cross entropy (nats/byte)", title=f"tiny MoE, {cd.corpus_packages}")

  ckpt_dir = launch_config.fresh_dir(os.path.join(workdir, "checkpoint"))
  tj.save_checkpoint(ckpt_dir, params, cfg, step=cd.steps,
                     metadata={"eval_loss": records[-1]["eval_loss"]})
  restored_cfg, restored = tj.load_checkpoint(ckpt_dir)
  restored_loss = float(eval_loss(restored, restored_cfg, eval_set))
  if restored_cfg != cfg or restored_loss != records[-1]["eval_loss"]:
    raise RuntimeError(f"checkpoint round trip changed the model: eval loss "
                       f"{records[-1]['eval_loss']} -> {restored_loss}")

  summary = {"initial_eval_loss": records[0]["eval_loss"],
             "final_eval_loss": records[-1]["eval_loss"],
             "final_train_loss": records[-1]["train_loss"],
             "restored_eval_loss": restored_loss, "train_seconds": train_seconds,
             "steps": cd.steps, "metrics": metrics, "plot": plot, "checkpoint": ckpt_dir}
  launch_config.write_summary(workdir, summary, cd)
  print(f"initial eval loss {summary['initial_eval_loss']:.4f} -> final eval loss "
        f"{summary['final_eval_loss']:.4f} (train {summary['final_train_loss']:.4f}) after "
        f"{cd.steps} steps in {train_seconds:.1f} s; checkpoint {ckpt_dir} restores it exactly")


if __name__ == "__main__":
  app.run(main)
