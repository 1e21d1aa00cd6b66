"""A timeline of failure and recovery events, written as JSONL."""

from __future__ import annotations

import collections
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

  def unexplained_declarations(self) -> list[dict]:
    """Workers declared failed that no fault touched (false alarms): each fault fired at a
    worker (`kill` or `hang`, and not ignored because the worker was not running) accounts for
    that worker's next declaration."""
    owed = collections.Counter()
    unexplained = []
    events = self.of("fault") + self.of("fault_ignored") + self.of("declared_failed")
    for ev in sorted(events, key=lambda e: e["t"]):
      if ev["event"] == "fault" and ev["kind"] in ("kill", "hang"):
        owed[ev["worker"]] += 1
      elif ev["event"] == "fault_ignored" and owed[ev["worker"]]:
        owed[ev["worker"]] -= 1
      elif ev["event"] == "declared_failed":
        if owed[ev["worker"]]:
          owed[ev["worker"]] -= 1
        else:
          unexplained.append(ev)
    return unexplained
