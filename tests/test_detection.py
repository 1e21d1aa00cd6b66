"""Failure detection inside the exchange: missing data, then probes, then a verdict.

Most tests run the detector on a fake clock (its time, sleeps and own run-queue wait are
scripted) and fake peers whose probes follow a scripted timeline, so that what they assert is
the verdict and the order of events, never how long a run took.
"""

import time

import pytest

from tarragon_jax.resilience.detector import DetectionConfig, Detector, SystemClock, WorkerTimeout
from tarragon_jax.resilience.faults import Fault, FaultInjector, parse_faults
from tarragon_jax.worker.fault_domain import FaultDomain, WorkerDead

PROBE = 0.01
POLL = 1e-4


class FakeClock:
  """Scripted time: `sleep` advances it; `starve(at, s)` makes the sleep that reaches `at` last
  `s` longer (the detector kept off the CPU). With `run_queue`, `waited()` reports the
  starvation as the kernel would (else None: the detector times its own sleeps)."""

  def __init__(self, run_queue: bool = False):
    self.t, self.run_queue = 0.0, run_queue
    self.queued, self.slices = 0.0, 0
    self._starve: list[tuple[float, float]] = []

  def now(self) -> float:
    return self.t

  def sleep(self, seconds: float):
    self.t += seconds
    self.slices += 1
    for at, extra in list(self._starve):
      if self.t >= at:
        self._starve.remove((at, extra))
        self.jump(extra)

  def jump(self, seconds: float):
    """Time passes while the detector's thread waits for a CPU."""
    self.t += seconds
    self.queued += seconds

  def starve(self, at: float, seconds: float):
    self._starve.append((at, seconds))

  def waited(self):
    return (self.queued, self.slices) if self.run_queue else None


class _Peer(FaultDomain):
  def __init__(self, name):
    self.name = name

  def call(self):
    return "data" if self._serving() else None


class Scripted(FaultDomain):
  """A peer whose probe fails in the scripted outages [start, end), and for good from `hung`;
  whose connection is closed from `killed`."""

  def __init__(self, name, clock, outages=(), hung=None, killed=None):
    self.name, self.clock, self.outages = name, clock, list(outages)
    self.hung, self.killed = hung, killed
    self.probes = 0

  def probe(self) -> bool:
    self.probes += 1
    t = self.clock.now()
    if self.hung is not None and t >= self.hung:
      return False
    return not any(a <= t < b for a, b in self.outages)

  def disconnected(self) -> bool:
    return self.killed is not None and self.clock.now() >= self.killed


def _cfg(**kw):
  return DetectionConfig(probe_interval_s=PROBE, poll_s=POLL, **kw)


def _watch_until(d: Detector, peer, clock: FakeClock, until: float, every: float = 1e-3) -> bool:
  """Calls `watch` every `every` s of fake time until `until` or a declaration."""
  while clock.t < until:
    if d.watch(peer):
      return True
    clock.sleep(every)
  return False


# Outages a healthy peer on a loaded host shows: each one recovered from, and each at most
# twice as long as the longest before it (so a margin-2 detector never reaches its timeout).
GROWING = [(0.100, 0.108), (0.300, 0.315), (0.500, 0.528), (0.700, 0.750), (0.900, 0.990)]
LATER = [(1.2 + 0.2 * k, 1.2 + 0.2 * k + 0.09) for k in range(8)]  # like the longest seen


def test_data_that_arrives_is_the_heartbeat():
  clock = FakeClock()
  d = Detector(_cfg(), clock=clock)
  peer = Scripted("ew0", clock)
  assert d.wait({"ew0": (peer, lambda: clock.t > 0.03)}) == []
  assert d.timeline.of("declared_failed") == []


def test_a_hung_peer_is_declared_after_a_probe_goes_unanswered():
  d, peer = Detector(_cfg()), _Peer("ew1")  # the real clock: only the verdict is asserted
  peer.hang()
  assert peer.call() is None and not peer.probe()
  assert d.silent(peer, expected_since=time.perf_counter())
  (ev,) = d.timeline.of("declared_failed")
  assert ev["worker"] == "ew1" and ev["how"] == "probe unanswered"


def test_on_a_quiet_host_a_hang_is_declared_two_probe_intervals_after_its_data_was_due():
  clock = FakeClock()
  d = Detector(_cfg(), clock=clock)
  assert d.silent(Scripted("ew1", clock, hung=0.0), expected_since=0.0)
  (ev,) = d.timeline.of("declared_failed")
  assert ev["timeout_s"] == PROBE and ev["unanswered_s"] >= PROBE
  assert 2 * PROBE <= ev["detection_s"] <= 2 * PROBE + 3 * POLL  # fake time: exact up to polls
  assert _cfg().quiet_window_s == pytest.approx(2 * PROBE)
  assert _cfg().window_s == pytest.approx(PROBE + _cfg().max_suspicion_s)
  assert d.window_s() == pytest.approx(2 * PROBE)


def test_a_killed_peer_is_declared_at_once():
  d, peer = Detector(_cfg()), _Peer("aw0")
  peer.kill()
  with pytest.raises(WorkerDead):
    peer.call()
  d.closed(peer, time.perf_counter())
  (ev,) = d.timeline.of("declared_failed")
  assert ev["how"] == "connection closed"


def test_a_dropped_connection_is_declared_at_once_even_when_suspicion_is_long():
  clock = FakeClock()
  d = Detector(_cfg(), clock=clock)
  ew = Scripted("ew0", clock, outages=GROWING)
  assert not _watch_until(d, ew, clock, 1.0)
  assert d.timeout_s() > 10 * PROBE  # it learned to wait long for such silences...
  ew.killed = clock.t
  assert d.silent(ew, expected_since=clock.t)  # ...but a closed connection is a certainty
  idle = Scripted("aw1", clock, killed=clock.t)
  assert d.watch(idle)
  assert [(e["worker"], e["how"], e["detection_s"]) for e in d.timeline.of("declared_failed")] == [
      ("ew0", "connection closed", 0.0), ("aw1", "connection closed", 0.0)]


def test_a_peer_seen_to_recover_from_outages_is_not_declared_for_a_similar_one():
  clock = FakeClock()
  d = Detector(_cfg(), clock=clock)
  ew = Scripted("ew0", clock, outages=GROWING + LATER)
  assert not _watch_until(d, ew, clock, 3.0)
  assert d.timeline.of("declared_failed") == []
  # margin x the longest silence seen: 90 ms, up to one probe interval more by the probes
  assert 2 * 0.09 - 1e-9 <= d.timeout_s() <= 2 * (0.09 + PROBE)
  assert d.window_s() == PROBE + d.timeout_s()
  # Load belongs to the host: another peer's first outage of that length is not a failure.
  aw = Scripted("aw1", clock, outages=[(clock.t + 0.01, clock.t + 0.09)])
  assert not _watch_until(d, aw, clock, clock.t + 0.2)
  assert d.timeline.of("declared_failed") == []

  # The same timeline under a fixed timeout (the detector before it adapted): a false alarm.
  clock = FakeClock()
  fixed = Detector(_cfg(adaptive=False), clock=clock)
  assert _watch_until(fixed, Scripted("ew0", clock, outages=GROWING + LATER), clock, 3.0)
  (ev,) = fixed.timeline.of("declared_failed")
  assert ev["how"] == "idle probe unanswered" and GROWING[1][0] <= clock.t < GROWING[1][1]


def test_data_path_silences_are_learned_too():
  clock = FakeClock()
  d = Detector(_cfg(), clock=clock)
  ew = Scripted("ew0", clock, outages=GROWING)
  for a, b in GROWING:  # each step's data arrives just after the outage ends
    clock.t = a - PROBE
    assert d.wait({"ew0": (ew, lambda b=b: clock.t >= b + 1e-3)}, expected_since=clock.t) == []
  assert d.timeline.of("declared_failed") == []
  assert 2 * 0.09 - 1e-9 <= d.timeout_s() <= 2 * (0.09 + PROBE)


def test_a_peer_silent_past_the_cap_is_declared():
  clock = FakeClock()
  d = Detector(_cfg(max_suspicion_s=0.15), clock=clock)
  ew = Scripted("ew0", clock, outages=GROWING, hung=1.5)
  assert not _watch_until(d, ew, clock, 1.4)
  assert d.timeout_s() == 0.15  # 2 x 90 ms, capped
  assert _watch_until(d, ew, clock, 5.0)
  (ev,) = d.timeline.of("declared_failed")
  assert ev["how"] == "idle probe unanswered" and ev["timeout_s"] == 0.15
  assert 0.15 <= ev["unanswered_s"] < 0.15 + 2 * PROBE
  assert 1.5 + 0.15 <= clock.t < 1.5 + 0.15 + 2 * PROBE  # fake time
  assert d.watch(ew)  # declared stays declared, and is not declared twice
  assert len(d.timeline.of("declared_failed")) == 1


def test_the_detectors_own_starvation_declares_nobody():
  # The whole host freezes for 0.3 s: the peer misses its heartbeats, the detector its polls.
  clock = FakeClock()
  d = Detector(_cfg(), clock=clock)
  ew = Scripted("ew0", clock, outages=[(0.05, 0.36)])
  clock.starve(at=0.06, seconds=0.29)
  assert d.wait({"ew0": (ew, lambda: clock.t >= 0.4)}, expected_since=0.0) == []
  assert d.timeline.of("declared_failed") == []
  assert d.timeout_s() == pytest.approx(2 * 0.29, abs=1e-3)  # load: every peer gets longer

  # The same freeze under a fixed wall-clock timeout (the detector before): declared.
  clock = FakeClock()
  fixed = Detector(_cfg(adaptive=False), clock=clock)
  clock.starve(at=0.06, seconds=0.29)
  assert fixed.wait({"ew0": (Scripted("ew0", clock, outages=[(0.05, 0.36)]),
                             lambda: clock.t >= 0.4)}, expected_since=0.0) == ["ew0"]


def test_a_jump_between_idle_probes_that_the_kernel_says_was_a_wait_for_a_cpu_is_not_evidence():
  clock = FakeClock(run_queue=True)
  d = Detector(_cfg(), clock=clock)
  aw = Scripted("aw0", clock, outages=[(0.02, 1.03)])
  assert not _watch_until(d, aw, clock, 0.025)  # one unanswered probe
  clock.jump(1.0)  # the detector's thread waited a second for a CPU
  assert not d.watch(aw)
  assert d.timeline.of("declared_failed") == []
  assert d.timeout_s() > 10 * PROBE  # the stall is a sign of load
  assert not _watch_until(d, aw, clock, 1.2)  # the peer answers again


def test_watch_probes_at_most_once_per_interval_and_a_new_worker_under_the_name_starts_afresh():
  clock = FakeClock()
  d = Detector(_cfg(), clock=clock)
  ew = Scripted("ew0", clock, hung=0.0)
  for k in range(20):  # 20 calls, 0.5 ms apart: one probe per interval
    d.watch(ew, now=k * 5e-4)
  assert ew.probes == 1
  assert d.watch(ew, now=PROBE)  # unanswered for one interval (its timeout)
  (ev,) = d.timeline.of("declared_failed")
  assert ev["detection_s"] == pytest.approx(PROBE)  # from its first unanswered probe
  replacement = Scripted("ew0", clock)
  assert not d.watch(replacement, now=3 * PROBE)  # a new object: fresh state
  d.forget("ew0")
  assert not d.watch(ew, now=4 * PROBE)  # forgotten: probed again, suspected, not yet declared


def test_data_heard_between_probes_ends_a_suspicion():
  # A store that fell behind and missed a probe, then caught up (its data is its heartbeat):
  # a later unanswered probe starts a new suspicion instead of adding to the old one.
  clock = FakeClock()
  d = Detector(_cfg(), clock=clock)
  store = Scripted("store", clock, outages=[(0.0, 0.006), (0.02, 1.0)])
  assert not d.watch(store, now=0.0)  # suspected
  clock.t = 0.005
  d.heard(store)
  assert not d.watch(store, now=0.02)  # suspected afresh, not declared
  assert d.watch(store, now=0.031)
  (ev,) = d.timeline.of("declared_failed")
  assert ev["detection_s"] == pytest.approx(0.011)  # from the new suspicion


def test_a_slow_peer_that_answers_probes_times_out_at_the_deadline_not_the_window():
  clock = FakeClock()
  d = Detector(_cfg(deadline_s=0.1), clock=clock)
  with pytest.raises(WorkerTimeout) as err:
    d.wait({"ew2": (Scripted("ew2", clock), lambda: False),
            "aw1": (Scripted("aw1", clock), lambda: True)})
  assert err.value.silent == ["ew2"] and clock.t >= 0.1
  assert d.timeline.of("declared_failed") == []


def test_the_system_clock_reads_the_threads_run_queue_wait_where_linux_says_it():
  reading = SystemClock().waited()
  assert reading is None or (reading[0] >= 0 and reading[1] >= 0)


@pytest.mark.parametrize("kw, match", [
    (dict(probe_interval_s=0.0), "probe_interval_s"),
    (dict(max_suspicion_s=0.0), "max_suspicion_s"),
    (dict(suspicion_margin=0.5), "suspicion_margin"),
    (dict(memory_s=-1.0), "memory_s"),
])
def test_bad_detection_config_is_refused(kw, match):
  with pytest.raises(ValueError, match=match):
    DetectionConfig(**kw)


def test_fault_schedule_parses_and_fires_once():
  faults = parse_faults("kill:ew1@step=6,layer=1; hang:aw0@t=2.5; kill:aw2@when=recovery;"
                        "restart:store@step=9; kill:ew0@step=3,lost_device=-1")
  assert faults[0] == Fault("ew1", "kill", step=6, layer=1)
  assert faults[1] == Fault("aw0", "hang", time_s=2.5)
  assert faults[2].when == "recovery" and faults[3].kind == "restart"
  assert faults[4].lost_device == -1
  inj = FaultInjector(faults[:1])
  assert inj.due(6, 0, 0.0, lambda: False, False, 0.0) == []
  assert inj.due(6, 1, 0.0, lambda: False, False, 0.0) == [faults[0]]
  assert inj.due(7, 0, 0.0, lambda: False, False, 0.0) == []


@pytest.mark.parametrize("spec, match", [
    ("kill:gpu3@step=1", "worker"),
    ("explode:ew1@step=1", "kind"),
    ("restart:ew1@step=1", "only the store"),
    ("kill:ew1", "when should it fire"),
    ("kill:ew1@when=lunch", "when="),
    ("kill:ew1@stp=1", "unknown key"),
    ("kill ew1", "expected kind:worker"),
])
def test_bad_fault_specs_name_the_problem(spec, match):
  with pytest.raises(ValueError, match=match):
    parse_faults(spec)
