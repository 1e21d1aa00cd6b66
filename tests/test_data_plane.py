"""The data plane's two transports: messages taken by tag whatever their order, "will not come"
from the control plane, a sender whose process is gone, and stale steps dropped."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tarragon_jax.runtime.peer_plane import ZmqPlane
from tarragon_jax.worker.dataplane import LocalPlane

LONG_S = 60.0  # a wait that only the behaviour under test may end early


def _local_pair():
  device = jax.devices()[1]
  a = LocalPlane(jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  b = LocalPlane(jax.sharding.SingleDeviceSharding(device))
  a.connect({"b": b.address})
  return a, b, device


def _zmq_pair():
  a, b = ZmqPlane(), ZmqPlane()
  a.connect({"b": b.address})
  b.connect({"a": a.address})
  return a, b


def test_local_messages_are_taken_by_tag_on_the_receivers_cell():
  a, b, device = _local_pair()
  x, y = np.arange(4.0), np.arange(4.0) + 10
  a.send([("b", (3, 1, 0, "a"), x), ("b", (3, 0, 0, "a"), y), ("nobody", (3, 0, 0, "a"), x)])
  got = b.take((3, 0, 0, "a"))
  np.testing.assert_array_equal(got, y)
  assert got.devices() == {device}
  assert b.take((3, 0, 1, "a")) is None  # another attempt: never sent
  np.testing.assert_array_equal(b.take((3, 1, 0, "a")), x)
  a.send([("b", (4, 0, 0, "a"), None)])  # the control plane: it will not come
  assert b.take((4, 0, 0, "a")) is None
  a.send([("b", (5, 0, 0, "a"), x), ("b", (5, 0, 0, "a"), None)])  # it came before the cancel
  np.testing.assert_array_equal(b.take((5, 0, 0, "a")), x)


def test_local_stale_steps_are_forgotten():
  a, b, _ = _local_pair()
  a.send([("b", (s, 0, 0, "a"), np.zeros(2)) for s in (1, 2, 3)])
  b.forget(before_step=3)
  assert b.take((1, 0, 0, "a")) is None and b.take((2, 0, 0, "a")) is None
  assert b.take((3, 0, 0, "a")) is not None


def test_zmq_messages_are_taken_by_tag_whatever_arrived_first():
  a, b = _zmq_pair()
  try:
    first, second = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)
    a.send([("b", (7, 1, 0, "a"), first), ("b", (7, 0, 1, "a"), second)])
    np.testing.assert_array_equal(b.take((7, 0, 1, "a"), LONG_S), second)
    np.testing.assert_array_equal(b.take((7, 1, 0, "a"), LONG_S), first)
    assert b.take((7, 2, 0, "a"), 0.0) is None  # not sent: no wait
  finally:
    a.close()
    b.close()


def test_zmq_a_message_that_will_not_come_ends_the_wait():
  a, b = _zmq_pair()
  control = ZmqPlane()
  control.connect({"b": b.address})
  try:
    control.send([("b", (1, 0, 0, "a"), None)])
    assert b.take((1, 0, 0, "a"), LONG_S) is None
    x = np.arange(3, dtype=np.float32)
    a.send([("b", (2, 0, 0, "a"), x), ("b", (9, 0, 0, "a"), x)])
    assert b.take((9, 0, 0, "a"), LONG_S) is not None  # so message 2 (sent before) is in too
    control.send([("b", (2, 0, 0, "a"), None), ("b", (3, 0, 0, "a"), None)])
    assert b.take((3, 0, 0, "a"), LONG_S) is None  # so the late cancel of 2 is in too
    np.testing.assert_array_equal(b.take((2, 0, 0, "a"), 0.0), x)  # it kept what arrived
  finally:
    for plane in (a, b, control):
      plane.close()


def test_zmq_a_sender_whose_process_is_gone_ends_the_wait():
  a, b = _zmq_pair()
  try:
    a.close()  # its inbox port now refuses connections, as a killed process's does
    assert b.take((1, 0, 0, "a"), LONG_S) is None
  finally:
    b.close()


@pytest.mark.parametrize("plane", ["local", "zmq"])
def test_a_send_to_a_peer_that_is_not_linked_is_dropped(plane):
  p = LocalPlane(None) if plane == "local" else ZmqPlane()
  try:
    p.send([("nobody", (0, 0, 0, "me"), np.zeros(1))])  # no error, nothing to wait for
  finally:
    p.close()
