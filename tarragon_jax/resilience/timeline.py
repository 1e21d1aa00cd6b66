"""A timeline of failure and recovery events, written as JSONL."""

from __future__ import annotations

import json
import threading
import time


class Timeline:
  """Append-only list of events: {"t": perf_counter seconds, "event": name, ...fields}."""

  def __init__(self):
    self.events: list[dict] = []
    self._lock = threading.Lock()

  def add(self, event: str, **fields) -> dict:
    record = dict(t=time.perf_counter(), event=event, **fields)
    with self._lock:
      self.events.append(record)
    return record

  def of(self, event: str) -> list[dict]:
    with self._lock:
      return [e for e in self.events if e["event"] == event]

  def write_jsonl(self, path: str, t0: float = 0.0):
    """Writes every event with times relative to `t0`."""
    with open(path, "w") as f:
      for e in list(self.events):
        f.write(json.dumps({**e, "t": e["t"] - t0}, default=str) + "\n")
