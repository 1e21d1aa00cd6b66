"""Trains the tiny MoE (configs/tiny.py's model) on Python's own stdlib sources, byte level.

About a minute on 2 CPU cores; writes metrics.jsonl, loss.png, summary.json and an orbax
checkpoint under `workdir`:

  python -m experiments.train --config=configs/train_tiny.py

Override any field, e.g. `--config.steps=50 --config.workdir=/tmp/train`.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = tiny.get_config().model
  c.seed = 0
  c.workdir = "runs/train_tiny"
  # Corpus: the .py files of these stdlib packages; the last eval_fraction of the bytes is held out.
  c.corpus_packages = "json,email,asyncio"
  c.eval_fraction = 0.1
  c.steps = 300
  c.batch_size = 16
  c.seq_len = 64  # tokens per training window (+1 for the shifted targets)
  c.learning_rate = 3e-3
  c.warmup_steps = 30
  c.weight_decay = 0.01
  c.grad_clip = 1.0
  c.eval_every = 25
  c.eval_batches = 4  # eval windows: eval_batches * batch_size, fixed for the whole run
  return c
