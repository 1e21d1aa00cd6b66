"""The stall metrics count every request a failure held up: in flight, queued, or arriving
during the outage."""

import pytest

from tarragon_jax.serving.metrics import TokenEvent, stall_summary


def _events(times: dict[int, list[float]]) -> list[TokenEvent]:
  return [TokenEvent(r, i, 0, t) for r, ts in times.items() for i, t in enumerate(ts)]


def test_a_request_in_flight_across_the_fault_is_held_up():
  events = _events({0: [0.0, 0.1, 0.2, 1.2, 1.3]})
  s = stall_summary(events, 0.25, {0: 0.0})
  assert s["held"] == 1
  assert s["service_stall_s"] == pytest.approx(1.0)
  assert s["max_request_gap_s"] == pytest.approx(1.0)
  assert s["max_request_stall_s"] == pytest.approx(0.9)  # beyond its usual 0.1 s
  assert s["recovered_after_s"] == pytest.approx(0.95)


def test_a_queued_request_is_held_up_though_it_had_no_token_yet():
  # Request 0 finished before the fault; request 1 arrived at 0.5 and waited through a 2 s
  # restart: nothing was in flight, but the service stalled all the same.
  events = _events({0: [0.0, 0.1, 0.2], 1: [2.6, 2.7]})
  s = stall_summary(events, 0.55, {0: 0.0, 1: 0.5})
  assert s["held"] == 1
  assert s["max_request_gap_s"] == pytest.approx(2.1)  # from its arrival
  assert s["service_stall_s"] == pytest.approx(2.1)  # not from the last token at 0.2 s
  assert s["recovered_after_s"] == pytest.approx(2.05)


def test_a_request_arriving_during_the_outage_is_held_up_one_after_it_is_not():
  # Request 0 waits through a restart from 0.2 to 3.0; request 1 arrives during it, request 2
  # after it.
  events = _events({0: [0.0, 0.1, 0.2, 3.0], 1: [3.0, 3.1], 2: [3.6]})
  s = stall_summary(events, 0.25, {0: 0.0, 1: 1.0, 2: 3.5})
  assert s["held"] == 2
  assert s["max_request_gap_s"] == pytest.approx(2.8)
  assert s["service_stall_s"] == pytest.approx(2.8)
  assert s["recovered_after_s"] == pytest.approx(2.75)  # both got a token at 3.0


def test_the_requests_in_flight_when_a_late_declaration_stops_service_are_held_up():
  # Killed at 1.0 while idle; request 0 arrives at 1.01 and is served until the failure is
  # found at 1.05, then waits through a restart until 3.0.
  events = _events({0: [1.02, 1.04, 3.0, 3.01]})
  assert stall_summary(events, 1.0, {0: 1.01})["held"] == 0  # as if found at once
  s = stall_summary(events, 1.0, {0: 1.01}, declared_at=1.05)
  assert s["held"] == 1 and s["service_stall_s"] == pytest.approx(1.96)


def test_an_idle_engine_holds_nobody_up():
  # Nothing waited at the fault, and it was found at once: a later arrival's wait is its own.
  events = _events({0: [0.0, 0.1], 1: [5.0, 5.1]})
  s = stall_summary(events, 1.0, {0: 0.0, 1: 4.9}, declared_at=1.01)
  assert s["held"] == 0 and s["service_stall_s"] == 0.0


def test_no_request_after_the_fault_is_no_stall():
  s = stall_summary(_events({0: [0.0, 0.1]}), 1.0, {0: 0.0})
  assert s["held"] == 0 and s["service_stall_s"] == 0.0 and s["max_request_gap_s"] == 0.0


def test_only_the_requests_asked_about_count():
  events = _events({0: [0.0, 0.1, 1.1], 1: [0.0, 0.1, 0.15]})
  s = stall_summary(events, 0.12, {0: 0.0, 1: 0.0}, requests={1})
  assert s["held"] == 1 and s["max_request_gap_s"] == pytest.approx(0.05)


def test_a_request_without_an_arrival_is_an_error():
  with pytest.raises(KeyError):
    stall_summary(_events({0: [0.0, 1.0]}), 0.5, {})


def test_a_queue_before_the_fault_is_not_the_failures():
  # Request 1 queued from 0.0; the fault at 1.0; its first token at 1.005: the failure caused
  # at most those 5 ms of its wait.
  events = _events({0: [0.5, 0.9, 1.1], 1: [1.005, 1.2]})
  s = stall_summary(events, 1.0, {0: 0.4, 1: 0.0})
  assert s["held"] == 2
  assert s["max_request_gap_s"] == pytest.approx(1.005)  # the whole wait
  # Request 0's gap across the fault (0.9 -> 1.1) is its usual 0.4 s: no stall.
  assert s["max_request_stall_s"] == pytest.approx(0.005)
