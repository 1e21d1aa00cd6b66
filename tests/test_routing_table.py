"""The expert routing table: an immutable logical expert -> physical slot map with an epoch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tarragon_jax.resilience.routing_table import RoutingTable
from tarragon_jax.worker.placement import place

# 2 layers, 8 experts, 4 EWs, 4 slots per EW per layer; every expert has one shadow.
PLACEMENT = place(2, 8, 4)
# Same cluster without shadows.
BARE = place(2, 8, 4, shadows_per_expert=0)


def _holds(placement, table: RoutingTable) -> np.ndarray:
  """i32[L, E]: the logical expert stored in each expert's active slot."""
  S = table.slots_per_layer
  a = table.active
  L, E = a.shape
  return np.array(
    [[placement.contents[l, a[l, e] // S, a[l, e] % S] for e in range(E)] for l in range(L)]
  )


def test_from_placement():
  t = RoutingTable.from_placement(PLACEMENT)
  assert t.epoch == 0
  assert t.slots_per_layer == 4
  np.testing.assert_array_equal(t.active, PLACEMENT.replicas[..., 0])
  assert t.active.tolist() == [[0, 4, 8, 12, 1, 5, 9, 13], [4, 8, 12, 0, 5, 9, 13, 1]]
  np.testing.assert_array_equal(_holds(PLACEMENT, t), np.tile(np.arange(8), (2, 1)))
  assert t.unreachable() == []
  assert t.ews_serving() == {0, 1, 2, 3}


def test_reroute_to_shadow():
  t = RoutingTable.from_placement(PLACEMENT)
  primary, shadow = (int(r) for r in t.replicas[1, 3])
  assert (primary, shadow) == (0, 6)
  new = t.reroute(1, 3, shadow)
  assert new.epoch == 1
  assert int(new.active[1, 3]) == shadow
  assert new.replicas[1, 3].tolist() == [shadow, primary]  # the old primary is the fallback
  # Nothing else moved.
  changed = np.argwhere(new.active != t.active).tolist()
  assert changed == [[1, 3]]
  np.testing.assert_array_equal(_holds(PLACEMENT, new), np.tile(np.arange(8), (2, 1)))
  # The original table is a value: unchanged.
  assert t.epoch == 0
  assert int(t.active[1, 3]) == primary
  assert t.replicas[1, 3].tolist() == [primary, shadow]


def test_reroute_back_and_forth_bumps_epoch_each_time():
  t = RoutingTable.from_placement(PLACEMENT)
  there = t.reroute(0, 5, int(t.replicas[0, 5, 1]))
  back = there.reroute(0, 5, int(t.replicas[0, 5, 0]))
  assert (t.epoch, there.epoch, back.epoch) == (0, 1, 2)
  np.testing.assert_array_equal(back.replicas, t.replicas)


def test_reroute_every_expert_to_its_shadow():
  t = RoutingTable.from_placement(PLACEMENT)
  for l in range(2):
    for e in range(8):
      t = t.reroute(l, e, int(PLACEMENT.replicas[l, e, 1]))
  assert t.epoch == 16
  np.testing.assert_array_equal(t.active, PLACEMENT.replicas[..., 1])
  np.testing.assert_array_equal(_holds(PLACEMENT, t), np.tile(np.arange(8), (2, 1)))


@pytest.mark.parametrize(
  "slot",
  [
    4,  # holds expert 1 of layer 0, not expert 0
    3,  # a slot on the right EW holding another expert
    -1,  # the "none" marker
    99,  # beyond the cluster
  ],
)
def test_reroute_to_slot_without_replica_raises(slot):
  t = RoutingTable.from_placement(PLACEMENT)
  message = rf"slot {slot} holds no replica of expert 0 in layer 0"
  with pytest.raises(ValueError, match=message) as err:
    t.reroute(0, 0, slot)
  assert "[0, 6]" in str(err.value)  # names the replicas it could use
  assert t.epoch == 0


def test_reroute_without_shadow_only_to_primary():
  t = RoutingTable.from_placement(BARE)
  with pytest.raises(ValueError, match="slot -1"):
    t.reroute(0, 0, -1)
  assert t.reroute(0, 0, 0).active.tolist() == t.active.tolist()


def test_without_ew_promotes_shadows():
  t = RoutingTable.from_placement(PLACEMENT)
  new = t.without_ew(2)
  assert new.epoch == 1
  assert new.unreachable() == []
  assert new.ews_serving() == {0, 1, 3}
  S = t.slots_per_layer
  moved = sorted(map(tuple, np.argwhere(t.active // S == 2).tolist()))
  assert moved == [(0, 2), (0, 6), (1, 1), (1, 5)]
  for l in range(2):
    for e in range(8):
      if (l, e) in moved:
        assert int(new.active[l, e]) == int(t.replicas[l, e, 1])
        assert int(new.replicas[l, e, 1]) == -1  # no further replica
      else:
        assert int(new.active[l, e]) == int(t.active[l, e])
      assert all(int(r) // S != 2 for r in new.replicas[l, e] if r >= 0)
  np.testing.assert_array_equal(_holds(PLACEMENT, new), np.tile(np.arange(8), (2, 1)))
  # Immutability.
  assert t.epoch == 0
  assert t.ews_serving() == {0, 1, 2, 3}


def test_without_ew_drops_shadows_on_that_ew_too():
  t = RoutingTable.from_placement(PLACEMENT)
  new = t.without_ew(3)
  # Experts whose primary survives but whose shadow was on EW 3 keep serving, with no fallback.
  S = t.slots_per_layer
  lost_shadow = [tuple(le) for le in np.argwhere(t.replicas[..., 1] // S == 3).tolist()]
  assert lost_shadow
  for l, e in lost_shadow:
    assert new.replicas[l, e].tolist() == [int(t.active[l, e]), -1]


@pytest.mark.parametrize(
  "ew,lost",
  [
    (0, [(0, 0), (0, 4), (1, 3), (1, 7)]),
    (1, [(0, 1), (0, 5), (1, 0), (1, 4)]),
    (3, [(0, 3), (0, 7), (1, 2), (1, 6)]),
  ],
)
def test_without_ew_and_no_shadows_lists_exactly_the_lost(ew, lost):
  t = RoutingTable.from_placement(BARE).without_ew(ew)
  assert t.unreachable() == lost
  assert t.ews_serving() == {0, 1, 2, 3} - {ew}
  for l, e in lost:
    assert int(t.active[l, e]) == -1


def test_two_ews_lost_with_one_shadow():
  t = RoutingTable.from_placement(PLACEMENT).without_ew(0).without_ew(1)
  assert t.epoch == 2
  # Each expert's shadow sits on the EW after its primary's, so experts homed on EW 0 lose both.
  assert t.unreachable() == [(0, 0), (0, 4), (1, 3), (1, 7)]


def test_device_array_is_the_active_table():
  t = RoutingTable.from_placement(PLACEMENT).reroute(0, 0, 6)
  np.testing.assert_array_equal(np.asarray(t.device_array()), t.active)


def test_table_arrays_are_read_only():
  t = RoutingTable.from_placement(PLACEMENT).reroute(0, 0, 6)
  with pytest.raises(ValueError):
    t.replicas[0, 0, 0] = 0
  with pytest.raises(dataclasses.FrozenInstanceError):
    t.epoch = 5


def test_computed_slots_are_the_primaries_until_a_shadow_serves():
  base = RoutingTable.from_placement(PLACEMENT)
  assert base.slots_in_use(4) == [2, 2, 2, 2]  # primaries in slots 0, 1 of each EW
  assert base.computed_slots(base, 4) == [2, 2, 2, 2]
  # Expert 0 of layer 1 onto its shadow: only the EW holding that shadow computes every slot.
  shadow = int(PLACEMENT.replicas[1, 0, 1])
  moved = base.reroute(1, 0, shadow)
  want = [2, 2, 2, 2]
  want[shadow // 4] = 4
  assert moved.computed_slots(base, 4) == want
  assert moved.reroute(1, 0, int(PLACEMENT.replicas[1, 0, 0])).computed_slots(base, 4) == [2] * 4
  # An EW lost: the EWs holding its experts' shadows compute every slot.
  lost = base.without_ew(2)
  assert lost.slots_in_use(4)[2] == 0
  assert lost.computed_slots(base, 4) == [4 if m in {int(p) // 4 for p in lost.active.ravel()
                                                     if int(p) % 4 >= 2} else 2
                                          for m in range(4)]
  assert 4 in lost.computed_slots(base, 4)


def test_computed_slots_of_uneven_primaries_cover_each_ews_own():
  placement = place(1, 8, 3)  # 3, 3 and 2 primaries; shadows after them
  base = RoutingTable.from_placement(placement)
  assert base.computed_slots(base, 3) == base.slots_in_use(3)
  for m, n in enumerate(base.slots_in_use(3)):
    held = placement.contents[0, m, :n]
    assert all(placement.replicas[0, e, 0] // placement.slots_per_layer == m for e in held)


def test_table_is_a_read_only_copy_of_the_array_it_is_given():
  mine = PLACEMENT.replicas.astype(np.int64)  # writeable, and not i32
  t = RoutingTable(mine, PLACEMENT.slots_per_layer)
  assert t.replicas.dtype == np.int32
  mine[0, 0, 0] = 7  # the caller's array changing does not change the table
  assert int(t.active[0, 0]) == int(PLACEMENT.replicas[0, 0, 0]) != 7
  with pytest.raises(ValueError, match="read-only"):
    t.replicas[0, 0, 0] = 7
