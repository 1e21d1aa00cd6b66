"""Failure detection inside the exchange: missing data, then a probe, then a verdict."""

import time

import pytest

from tarragon_jax.resilience.detector import DetectionConfig, Detector, WorkerTimeout
from tarragon_jax.resilience.fault_domain import FaultDomain, WorkerDead
from tarragon_jax.resilience.faults import Fault, FaultInjector, parse_faults

PROBE = 0.01


class _Peer(FaultDomain):
  def __init__(self, name):
    self.name = name

  def call(self):
    return "data" if self._serving() else None


def _detector(deadline=2.0):
  return Detector(DetectionConfig(probe_interval_s=PROBE, deadline_s=deadline))


def test_data_that_arrives_is_the_heartbeat():
  d = _detector()
  start = time.perf_counter()
  assert d.wait({"ew0": (_Peer("ew0"), lambda: time.perf_counter() - start > 0.03)}) == []
  assert d.timeline.of("declared_failed") == []


def test_a_hung_peer_is_declared_after_a_probe_goes_unanswered():
  d, peer = _detector(), _Peer("ew1")
  peer.hang()
  assert peer.call() is None and not peer.probe()
  start = time.perf_counter()
  assert d.silent(peer, expected_since=start)
  took = time.perf_counter() - start
  (ev,) = d.timeline.of("declared_failed")
  assert ev["worker"] == "ew1" and ev["how"] == "probe unanswered"
  assert 2 * PROBE <= took < 2 * PROBE + 0.05
  assert DetectionConfig(probe_interval_s=PROBE).window_s == pytest.approx(2 * PROBE)


def test_a_killed_peer_is_declared_at_once():
  d, peer = _detector(), _Peer("aw0")
  peer.kill()
  with pytest.raises(WorkerDead):
    peer.call()
  d.closed(peer, time.perf_counter())
  (ev,) = d.timeline.of("declared_failed")
  assert ev["how"] == "connection closed" and ev["detection_s"] < 0.01


def test_a_slow_peer_that_answers_probes_times_out_at_the_deadline_not_the_window():
  d = _detector(deadline=0.1)
  with pytest.raises(WorkerTimeout) as err:
    d.wait({"ew2": (_Peer("ew2"), lambda: False), "aw1": (_Peer("aw1"), lambda: True)})
  assert err.value.silent == ["ew2"]
  assert d.timeline.of("declared_failed") == []


def test_bad_detection_config_is_refused():
  with pytest.raises(ValueError, match="probe_interval_s"):
    DetectionConfig(probe_interval_s=0.0)


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
