"""Failure detection inside the data exchange.

Data arriving is the heartbeat: nothing is sent just to say "alive". When a peer's data is
missing, the receiver keeps polling for it for one probe interval, then probes the peer on the
control channel; a probe left unanswered for another interval declares the peer failed. A peer
that answers is only slow, and is waited for up to `deadline_s`. A peer whose connection is
closed (a killed worker; a worker process whose connection dropped) is declared at once. The
worst-case detection latency of a hang is therefore `window_s` = two probe intervals.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from tarragon_jax.resilience.fault_domain import FaultDomain
from tarragon_jax.resilience.timeline import Timeline


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
  probe_interval_s: float = 0.01  # the paper probes every 10 ms
  deadline_s: float = 10.0  # total wait for a peer that answers probes but sends nothing
  poll_s: float = 1e-4

  def __post_init__(self):
    if not 0 < self.probe_interval_s < self.deadline_s:
      raise ValueError(f"DetectionConfig: need 0 < probe_interval_s={self.probe_interval_s} "
                       f"< deadline_s={self.deadline_s}")

  @property
  def window_s(self) -> float:
    """Worst-case time from the last expected data to declaring a hung peer failed."""
    return 2 * self.probe_interval_s


class WorkerTimeout(RuntimeError):
  """Peers that answered probes but sent no data within the deadline."""

  def __init__(self, silent: list[str], waited_s: float):
    super().__init__(f"no output from {silent} within {waited_s:.3f} s (they answer probes)")
    self.silent = silent


class Detector:
  """Decides, from missing data and probes, which peers have failed; records each detection."""

  def __init__(self, cfg: DetectionConfig = DetectionConfig(), timeline: Timeline | None = None):
    self.cfg = cfg
    self.timeline = timeline if timeline is not None else Timeline()

  def closed(self, worker: FaultDomain, expected_since: float) -> None:
    """The peer's connection is closed (it was killed): declared failed without waiting."""
    self.declare(worker, expected_since, "connection closed")

  def silent(self, worker: FaultDomain, arrived: Callable[[], bool] = lambda: False,
             expected_since: float | None = None) -> bool:
    """The peer's data is missing. Returns True if it is declared failed, False if it arrived."""
    start = time.perf_counter() if expected_since is None else expected_since
    failed = self.wait({worker.name: (worker, arrived)}, start)
    return bool(failed)

  def wait(self, peers: dict[str, tuple[FaultDomain, Callable[[], bool]]],
           expected_since: float | None = None) -> list[str]:
    """Waits for every peer's data; returns the names of peers declared failed.

    Raises:
      WorkerTimeout: a peer answers probes but sends nothing within `deadline_s`.
    """
    cfg = self.cfg
    start = time.perf_counter() if expected_since is None else expected_since
    pending = dict(peers)
    probed: dict[str, float] = {}  # peer -> when its unanswered probe was sent
    failed = []
    while pending:
      now = time.perf_counter()
      for name, (worker, arrived) in list(pending.items()):
        if arrived():
          del pending[name]
        elif worker.disconnected():
          self.closed(worker, start)
          failed.append(name)
          del pending[name]
        elif now - start >= cfg.probe_interval_s:
          if worker.probe():
            probed.pop(name, None)
          elif name not in probed:
            probed[name] = now
          elif now - probed[name] >= cfg.probe_interval_s:
            self.declare(worker, start, "probe unanswered")
            failed.append(name)
            del pending[name]
      if pending and now - start > cfg.deadline_s:
        raise WorkerTimeout(sorted(pending), now - start)
      if pending:
        time.sleep(cfg.poll_s)
    return failed

  def declare(self, worker: FaultDomain, expected_since: float, how: str):
    """Records that `worker` is declared failed; its data was expected since `expected_since`."""
    now = time.perf_counter()
    self.timeline.add("declared_failed", worker=worker.name, how=how,
                      detection_s=now - expected_since)
