"""The data plane's transports: messages taken by tag whatever their order, "will not come"
from the control plane, a sender whose process is gone, stale steps dropped, and (pulls) a pull
that never ends abandoned."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tarragon_jax.runtime.peer_plane import Incoming, ZmqPlane
from tarragon_jax.runtime.transfer_plane import TransferPlane
from tarragon_jax.worker.dataplane import LocalPlane

LONG_S = 60.0  # a wait that only the behaviour under test may end early


def _local_pair():
  device = jax.devices()[1]
  a = LocalPlane(jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  b = LocalPlane(jax.sharding.SingleDeviceSharding(device))
  a.connect({"b": b.address})
  return a, b, device


PROCESS_PLANES = {"zmq": ZmqPlane, "transfer": TransferPlane}


def _process_pair(kind: str = "zmq"):
  a, b = PROCESS_PLANES[kind](), PROCESS_PLANES[kind]()
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


@pytest.mark.parametrize("kind", PROCESS_PLANES)
def test_process_messages_are_taken_by_tag_whatever_arrived_first(kind):
  a, b = _process_pair(kind)
  try:
    first, second = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)
    a.send([("b", (7, 1, 0, "a"), first), ("b", (7, 0, 1, "a"), second)])
    np.testing.assert_array_equal(b.take((7, 0, 1, "a"), LONG_S), second)
    np.testing.assert_array_equal(b.take((7, 1, 0, "a"), LONG_S), first)
    assert b.take((7, 2, 0, "a"), 0.0) is None  # not sent: no wait
  finally:
    a.close()
    b.close()


@pytest.mark.parametrize("kind", PROCESS_PLANES)
def test_process_a_message_that_will_not_come_ends_the_wait(kind):
  a, b = _process_pair(kind)
  control = ZmqPlane()
  control.connect({"b": b.address})
  try:
    control.send([("b", (1, 0, 0, "a"), None)])
    assert b.take((1, 0, 0, "a"), LONG_S) is None
    x = np.arange(3, dtype=np.float32)
    a.send([("b", (2, 0, 0, "a"), x), ("b", (9, 0, 0, "a"), x)])
    assert b.take((9, 0, 0, "a"), LONG_S) is not None  # so message 2 (sent before) is in too
    if isinstance(b.inbox[2, 0, 0, "a"], Incoming):  # (a pull: arrived once it is done)
      assert b.inbox[2, 0, 0, "a"].done.wait(LONG_S)
    control.send([("b", (2, 0, 0, "a"), None), ("b", (3, 0, 0, "a"), None)])
    assert b.take((3, 0, 0, "a"), LONG_S) is None  # so the late cancel of 2 is in too
    np.testing.assert_array_equal(b.take((2, 0, 0, "a"), 0.0), x)  # it kept what arrived
  finally:
    for plane in (a, b, control):
      plane.close()


@pytest.mark.parametrize("kind", PROCESS_PLANES)
def test_process_a_sender_whose_process_is_gone_ends_the_wait(kind):
  a, b = _process_pair(kind)
  try:
    a.close()  # its inbox port now refuses connections, as a killed process's does
    assert b.take((1, 0, 0, "a"), LONG_S) is None
  finally:
    b.close()


_ABANDON = """
import os, sys
sys.path.insert(0, {tests!r})
from test_data_plane import LONG_S, _process_pair
from tarragon_jax.runtime import wire
from tarragon_jax.runtime.peer_plane import Incoming, ZmqPlane
a, b = _process_pair("transfer")
control = ZmqPlane()
control.connect({{"b": b.address}})
# A notice for an array that the (live) sender never offers: its pull would hang.
notice = {{"tag": [1, 0, 0, "a"], "x": None, "pull": [a._server_address, 10**9, [2], "float32"]}}
a._links["b"][1].send_multipart(wire.encode(notice))
a.send([("b", (9, 0, 0, "a"), None)])
b.take((9, 0, 0, "a"), LONG_S)  # so the notice (sent before) is in too
pending = isinstance(b.inbox[1, 0, 0, "a"], Incoming)
control.send([("b", (1, 0, 0, "a"), None)])
got = b.take((1, 0, 0, "a"), LONG_S)
print(pending, got is None, b.missed, b.abandoned, flush=True)
os._exit(0)  # (an abandoned pull: see TransferPlane)
"""


def test_a_pull_that_never_ends_is_abandoned_when_the_control_plane_cancels_it():
  # In a process of its own, which ends as a worker process does (`os._exit`).
  tests = os.path.dirname(os.path.abspath(__file__))
  out = subprocess.run([sys.executable, "-c", _ABANDON.format(tests=tests)], capture_output=True,
                       text=True, timeout=LONG_S, check=True).stdout.split()
  assert out == ["True", "True", "cancelled", "1"]


@pytest.mark.parametrize("plane", ["local", *PROCESS_PLANES])
def test_a_send_to_a_peer_that_is_not_linked_is_dropped(plane):
  p = LocalPlane(None) if plane == "local" else PROCESS_PLANES[plane]()
  try:
    p.send([("nobody", (0, 0, 0, "me"), np.zeros(1))])  # no error, nothing to wait for
  finally:
    p.close()
