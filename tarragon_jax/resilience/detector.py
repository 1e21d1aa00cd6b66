"""Failure detection inside the data exchange, with a suspicion timeout that adapts to load.

Data arriving is the heartbeat: nothing is sent just to say "alive". When a peer's data is
missing, the receiver keeps polling for it for one probe interval, then probes the peer on the
control channel. A peer whose connection is closed (a killed worker: its process exited, its
port refuses) is declared at once: that is a certainty. An unanswered probe is only a
suspicion: the peer is declared once its probes have gone unanswered for the *suspicion
timeout*; a peer that answers is only slow, and is waited for up to `deadline_s`. Idle peers
(nothing in flight to them) are probed with `Detector.watch`.

The suspicion timeout is an adaptive timeout of the kind of Chen et al.'s and Bertier et al.'s
heartbeat detectors (an estimate of how long a healthy peer can stay silent, plus a safety
margin), clamped to `[probe_interval_s, max_suspicion_s]`:

  timeout = suspicion_margin * max(longest silence a peer was seen to recover from,
                                   longest stall of the detector itself),

both within the last `memory_s`. On a quiet host neither occurs and the timeout is one probe
interval (a hang is declared two probe intervals after its data was due). Under CPU load healthy
workers miss heartbeats and recover, and the detector is itself kept off the CPU: the timeout
grows until such silences no longer reach it, and shrinks back once they are `memory_s` old. The
estimate is shared by all peers (load belongs to the host, and a peer's first outage should not
be the one that teaches it) and is a windowed maximum, not a smoothed mean as in Jacobson and
Karels' RTO: on a loaded host long silences are rare among many short ones, and a mean forgets
the long one after a few short ones. Not phi-accrual either: a probe only says whether the peer's
heartbeat connection is up (libzmq gives no PONG arrival times to fit a distribution to), and
scheduling delays are heavy-tailed, which a normal or exponential tail underestimates.

Time the detector itself was not running is not evidence against anyone (like Cassandra's
detector, which convicts nobody after a local pause): silence is counted in the detector's own
running time, without the calling thread's run-queue wait (Linux schedstat; elsewhere the
overshoot of its polling sleeps), and one gap between two observations of a peer counts for at
most half the timeout (or two probe intervals), so a peer is not declared on two observations
either side of a long pause.

`DetectionConfig.window_s` is thus the worst-case detection latency of a hang, in the detector's
running time: one probe interval before the first probe, then the timeout at its cap;
`Detector.window_s()` is its current value.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from collections.abc import Callable

from tarragon_jax.resilience.timeline import Timeline
from tarragon_jax.worker.fault_domain import FaultDomain

# A wait that can block until data arrives (`Detector.wait(block=...)`) blocks this many polling
# intervals at most, so that a peer's closed connection is still noticed within ~1 ms while a
# waiting driver stops spinning on the cores its workers need.
BLOCK_POLLS = 10

@dataclasses.dataclass(frozen=True)
class DetectionConfig:
  probe_interval_s: float = 0.01  # the paper probes every 10 ms
  deadline_s: float = 10.0  # total wait for a peer that answers probes but sends nothing
  poll_s: float = 1e-4
  adaptive: bool = True  # False: a fixed one-interval timeout in wall time (no learning)
  max_suspicion_s: float = 1.0  # the cap of the adaptive suspicion timeout
  suspicion_margin: float = 2.0  # timeout = margin x the longest silence seen to end well
  memory_s: float = 60.0  # how long such a silence (or a stall of the detector) is remembered

  def __post_init__(self):
    if not 0 < self.probe_interval_s < self.deadline_s:
      raise ValueError(f"DetectionConfig: need 0 < probe_interval_s={self.probe_interval_s} "
                       f"< deadline_s={self.deadline_s}")
    if not self.poll_s > 0:
      raise ValueError(f"DetectionConfig: poll_s={self.poll_s} must be > 0")
    if not self.max_suspicion_s > 0:
      raise ValueError(f"DetectionConfig: max_suspicion_s={self.max_suspicion_s} must be > 0 "
                       f"(the longest a peer's probes may go unanswered before it is declared)")
    if not self.suspicion_margin >= 1:
      raise ValueError(f"DetectionConfig: suspicion_margin={self.suspicion_margin} must be >= 1 "
                       f"(a silence as long as one already seen to end well is not a failure)")
    if not self.memory_s >= 0:
      raise ValueError(f"DetectionConfig: memory_s={self.memory_s} must be >= 0 (0: the timeout "
                       f"stays at one probe interval)")

  @property
  def suspicion_cap_s(self) -> float:
    """The longest suspicion timeout: `max_suspicion_s`, or one probe interval if that is longer
    (then the timeout is fixed)."""
    return max(self.max_suspicion_s, self.probe_interval_s)

  @property
  def window_s(self) -> float:
    """Worst-case time, in the detector's running time, from the last expected data to
    declaring a hung peer failed: one probe interval, then the suspicion timeout at its cap."""
    return self.probe_interval_s + (self.suspicion_cap_s if self.adaptive
                                    else self.probe_interval_s)

  @property
  def quiet_window_s(self) -> float:
    """The same on a quiet host (no silence or stall seen yet): two probe intervals."""
    return 2 * self.probe_interval_s


class WorkerTimeout(RuntimeError):
  """Peers that answered probes but sent no data within the deadline."""

  def __init__(self, silent: list[str], waited_s: float):
    super().__init__(f"no output from {silent} within {waited_s:.3f} s (they answer probes)")
    self.silent = silent


class SystemClock:
  """The detector's time: `perf_counter`, `time.sleep`, and how long the calling thread has
  waited for a CPU (tests pass a fake with the same three methods)."""

  def __init__(self):
    self._local = threading.local()

  def now(self) -> float:
    return time.perf_counter()

  def sleep(self, seconds: float):
    time.sleep(seconds)

  def waited(self) -> tuple[float, int] | None:
    """(seconds the calling thread has spent runnable but not running, times it was given a
    CPU), both cumulative; None where the kernel does not say (then the detector times its own
    sleeps instead)."""
    fd = getattr(self._local, "fd", None)
    if fd is None:
      try:
        fd = self._local.fd = _Fd(os.open("/proc/thread-self/schedstat", os.O_RDONLY))
      except OSError:
        return None
    try:
      _, wait_ns, slices = os.pread(fd.fd, 128, 0).split()
      return int(wait_ns) * 1e-9, int(slices)
    except (OSError, ValueError):
      return None


class _Fd:
  """A file descriptor closed with the thread-local that holds it (when its thread ends)."""

  def __init__(self, fd: int):
    self.fd = fd

  def __del__(self):
    try:
      os.close(self.fd)
    except (OSError, TypeError, AttributeError):  # at interpreter exit `os` may be gone
      pass


class _Peak:
  """The largest value added within the last `memory_s` seconds (a monotonic queue)."""

  def __init__(self, memory_s: float):
    self.memory_s = memory_s
    self._q: collections.deque[tuple[float, float]] = collections.deque()  # (t, v), v decreasing

  def add(self, t: float, value: float):
    while self._q and self._q[-1][1] <= value:
      self._q.pop()
    self._q.append((t, value))

  def max(self, t: float) -> float:
    while self._q and self._q[0][0] < t - self.memory_s:
      self._q.popleft()
    return self._q[0][1] if self._q else 0.0


@dataclasses.dataclass
class _Suspicion:
  since: float  # when its first probe went unanswered
  last: float  # when it was last seen unanswered
  stalled: float  # the detector's stall account then
  unanswered_s: float = 0.0  # silence counted so far (the detector's running time)


@dataclasses.dataclass
class _Peer:
  worker: FaultDomain  # a replacement under the same name is a new object: it starts afresh
  suspicion: _Suspicion | None = None
  watched: float | None = None  # when `watch` last probed it
  declared: bool = False


class Detector:
  """Decides, from missing data and probes, which peers have failed; records each detection.

  Per worker name it keeps the running suspicion, the last idle probe and whether the worker was
  declared; `forget(name)` drops them (a new worker object under the name starts afresh by
  itself). The timeout's estimate (silences recovered from, the detector's own stalls) is
  shared by all peers and kept across names.
  """

  def __init__(self, cfg: DetectionConfig = DetectionConfig(), timeline: Timeline | None = None,
               clock=None):
    """`clock`: `now()`, `sleep(s)`, `waited()` as `SystemClock` (the default) has them."""
    self.cfg = cfg
    self.timeline = timeline if timeline is not None else Timeline()
    self.clock = clock if clock is not None else SystemClock()
    self._peers: dict[str, _Peer] = {}
    self._stalls = _Peak(cfg.memory_s)  # the detector's own stalls
    self._recovered = _Peak(cfg.memory_s)  # silences any peer recovered from
    self._stalled = 0.0  # s, the detector's time off the CPU so far
    self._schedstat = True  # the clock says how long the thread waited for a CPU
    self._last_waited = threading.local()

  # -- the current timeout ---------------------------------------------------------------------

  def timeout_s(self, now: float | None = None) -> float:
    """The suspicion timeout at `now`: how long a peer's probes may go unanswered before it is
    declared. One for every peer: what lengthens it (load) is a property of the host."""
    cfg = self.cfg
    if not cfg.adaptive:
      return cfg.probe_interval_s
    now = self.clock.now() if now is None else now
    seen = max(self._stalls.max(now), self._recovered.max(now))
    return min(max(cfg.suspicion_margin * seen, cfg.probe_interval_s), cfg.suspicion_cap_s)

  def window_s(self) -> float:
    """The current worst-case detection latency of a hang (in the detector's running time): one
    probe interval, then the suspicion timeout. At most `cfg.window_s`."""
    return self.cfg.probe_interval_s + self.timeout_s()

  # -- verdicts --------------------------------------------------------------------------------

  def closed(self, worker: FaultDomain, expected_since: float) -> None:
    """The peer's connection is closed (it was killed): declared failed without waiting."""
    self.declare(worker, expected_since, "connection closed")

  def silent(self, worker: FaultDomain, arrived: Callable[[], bool] = lambda: False,
             expected_since: float | None = None) -> bool:
    """The peer's data is missing. Returns True if it is declared failed, False if it arrived."""
    return bool(self.wait({worker.name: (worker, arrived)}, expected_since))

  def wait(self, peers: dict[str, tuple[FaultDomain, Callable[[], bool]]],
           expected_since: float | None = None,
           block: Callable[[float], object] | None = None,
           on_failed: Callable[[str], object] | None = None) -> list[str]:
    """Waits for every peer's data; returns the names of peers declared failed.

    A peer already declared is failed at once (and not declared again). `block(timeout_s)`,
    if given, returns as soon as some peer's data may have arrived (e.g. a poll on their
    sockets), or after `timeout_s`: the detector then sleeps until something happens instead
    of polling every `poll_s`. `on_failed(name)` is called as soon as a peer is failed, while
    the others are still waited for (e.g. to release the peers that wait on its data).

    Raises:
      WorkerTimeout: a peer answers probes but sends nothing within `deadline_s`.
    """
    cfg, clock = self.cfg, self.clock
    start = clock.now() if expected_since is None else expected_since
    pending = dict(peers)
    failed = []
    while pending:
      for name, (worker, arrived) in list(pending.items()):
        peer = self._peer(worker)
        if peer.declared:
          failed.append(name)
        elif arrived():
          self._answered(peer)
        elif worker.disconnected():
          self.closed(worker, start)
          failed.append(name)
        elif clock.now() - start < cfg.probe_interval_s:
          continue
        elif worker.probe():
          self._answered(peer)
          continue
        elif self._unanswered(peer):
          self._declare_silent(peer, start, "probe unanswered")
          failed.append(name)
        else:
          continue
        del pending[name]
        if on_failed is not None and failed and failed[-1] == name:
          on_failed(name)
      if pending:
        waited = clock.now() - start
        if waited > cfg.deadline_s:
          raise WorkerTimeout(sorted(pending), waited)
        self._pause(block)
    return failed

  def watch(self, worker: FaultDomain, now: float | None = None) -> bool:
    """Probes an idle member (nothing in flight to it), at most once per probe interval.

    Returns True once it is declared failed: at once if its connection is closed ("connection
    closed"), else once its probes have gone unanswered for its suspicion timeout ("idle probe
    unanswered"); then on every later call, until `forget` (or a new worker object under its
    name).
    """
    peer = self._peer(worker)
    if peer.declared:
      return True
    now = self.clock.now() if now is None else now
    if peer.watched is not None and now - peer.watched < self.cfg.probe_interval_s:
      return False
    peer.watched = now
    if worker.disconnected():
      self.declare(worker, peer.suspicion.since if peer.suspicion else now, "connection closed",
                   now)
      return True
    if worker.probe():
      self._answered(peer, now)
      return False
    if self._unanswered(peer, now):
      self._declare_silent(peer, peer.suspicion.since, "idle probe unanswered", now)
      return True
    return False

  def heard(self, worker: FaultDomain):
    """Data arrived from `worker` outside `wait` (the heartbeat): a running suspicion ends."""
    self._answered(self._peer(worker))

  def forget(self, name: str):
    """Drops everything known about `name` (a replacement takes the name over)."""
    self._peers.pop(name, None)

  def declare(self, worker: FaultDomain, expected_since: float, how: str,
              now: float | None = None, **details):
    """Records that `worker` is declared failed (at `now`, default the clock's); its data was
    expected since `expected_since`. `details` go into the timeline event as they are. A worker
    is declared once: later calls (e.g. several calls to it were in flight) record nothing."""
    peer = self._peer(worker)
    if peer.declared:
      return
    peer.declared = True
    now = self.clock.now() if now is None else now
    self.timeline.add("declared_failed", worker=worker.name, how=how,
                      detection_s=now - expected_since, **details)

  # -- internals -------------------------------------------------------------------------------

  def _peer(self, worker: FaultDomain) -> _Peer:
    peer = self._peers.get(worker.name)
    if peer is None or peer.worker is not worker:
      peer = self._peers[worker.name] = _Peer(worker)
    return peer

  def _declare_silent(self, peer: _Peer, expected_since: float, how: str,
                      now: float | None = None):
    s = peer.suspicion
    self.declare(peer.worker, expected_since, how, now, unanswered_s=round(s.unanswered_s, 6),
                 timeout_s=round(self.timeout_s(now), 6))

  def _unanswered(self, peer: _Peer, now: float | None = None) -> bool:
    """Counts an unanswered probe; True if the peer has now been silent for its timeout."""
    now = self.clock.now() if now is None else now
    stalled = self._account()
    s = peer.suspicion
    if s is None:
      peer.suspicion = _Suspicion(since=now, last=now, stalled=stalled)
      return False
    self._count(s, now, stalled)
    return s.unanswered_s >= self.timeout_s(now)

  def _count(self, s: _Suspicion, now: float, stalled: float):
    """Adds the silence since `s.last` that counts as evidence: without the detector's own
    stalls, and at most half the timeout for one gap between observations."""
    gap = now - s.last
    if self.cfg.adaptive:
      cfg = self.cfg
      gap = min(max(0.0, gap - (stalled - s.stalled)),
                max(2 * cfg.probe_interval_s, self.timeout_s(now) / 2))
    s.unanswered_s += gap
    s.last, s.stalled = now, stalled

  def _answered(self, peer: _Peer, now: float | None = None):
    """The peer answered (data or probe): a running suspicion ends, and its silence is one the
    peer recovered from."""
    s = peer.suspicion
    if s is None:
      return
    now = self.clock.now() if now is None else now
    self._count(s, now, self._account())
    peer.suspicion = None
    self._remember(self._recovered, now, s.unanswered_s)

  def _account(self) -> float:
    """The detector's stall account (s off the CPU so far), brought up to date from the calling
    thread's run-queue wait; each stall since the last look is remembered as a sign of load."""
    if self.cfg.adaptive and self._schedstat:
      reading = self.clock.waited()
      if reading is None:
        self._schedstat = False  # from now on, `_pause` times its own sleeps
      else:
        last = getattr(self._last_waited, "reading", None)
        self._last_waited.reading = reading
        if last is not None and reading[0] > last[0]:
          waited = reading[0] - last[0]
          self._stall(waited, waited / max(1, reading[1] - last[1]))
    return self._stalled

  def _stall(self, total_s: float, longest_s: float):
    self._stalled += total_s
    self._remember(self._stalls, self.clock.now(), longest_s)

  def _remember(self, peak: _Peak, t: float, seconds: float):
    """Adds a silence or stall to an estimate if it could lengthen the timeout (so that a quiet
    host's many tiny stalls cost nothing to keep)."""
    cfg = self.cfg
    if cfg.adaptive and cfg.suspicion_margin * seconds > cfg.probe_interval_s:
      peak.add(t, seconds)

  def _pause(self, block: Callable[[float], object] | None = None):
    """One polling sleep (or `block`, for up to `BLOCK_POLLS` polls); without schedstat, its
    overshoot is the detector's stall."""
    cfg, clock = self.cfg, self.clock
    t0 = clock.now()
    timeout = cfg.poll_s if block is None else BLOCK_POLLS * cfg.poll_s
    (clock.sleep if block is None else block)(timeout)
    if not cfg.adaptive:
      return
    if not self._schedstat:
      late = clock.now() - t0 - timeout
      if late > 0:
        self._stall(late, late)
    else:
      self._account()
