"""Placement of primary and shadow experts on expert workers, within a per-EW slot budget.

A physical slot p lives on EW p // S (S = slots per EW per layer) at local slot p % S.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import tarragon_jax as tj
from tarragon_jax.worker.placement import place, slots_for_budget

# hidden 32 x expert_hidden 64, f32: one expert is 3 * 32 * 64 * 4 bytes.
CFG = tj.ModelConfig(hidden_size=32, expert_hidden=64, num_layers=2, num_experts=8)
EXPERT_BYTES = 24_576

# (num_layers, num_experts, num_ew, slots_per_layer or None, shadows_per_expert)
SHAPES = [
  (L, E, W, S, shadows)
  for L, E, W, S, shadows in itertools.product(
    [1, 2], [1, 3, 7, 8, 16], [1, 2, 3, 4, 8], [None, "tight", "tight+1"], [0, 1, 2]
  )
]


def _slots(E: int, W: int, S) -> int | None:
  need = -(-E // W)
  return {None: None, "tight": need, "tight+1": need + 1}[S]


def _replica_ews(p, l: int, e: int) -> list[int]:
  return [int(r) // p.slots_per_layer for r in p.replicas[l, e] if r >= 0]


@pytest.mark.parametrize("L,E,W,S,shadows", SHAPES)
def test_placement_invariants(L, E, W, S, shadows):
  p = place(L, E, W, _slots(E, W, S), shadows)
  S = p.slots_per_layer
  assert p.contents.shape == (L, W, S)
  assert p.replicas.shape == (L, E, 1 + shadows)
  for l in range(L):
    for e in range(E):
      ews = _replica_ews(p, l, e)
      assert p.replicas[l, e, 0] >= 0, f"layer {l} expert {e} has no primary"
      # No two replicas of one expert share an EW (a shadow never sits with its primary).
      assert len(set(ews)) == len(ews), (l, e, p.replicas[l, e].tolist())
      # Every replica slot really holds that expert.
      for r in p.replicas[l, e]:
        if r >= 0:
          assert p.contents[l, r // S, r % S] == e
      # Replicas are packed: no live slot after a -1.
      row = p.replicas[l, e].tolist()
      assert row == [r for r in row if r >= 0] + [-1] * row.count(-1)
    # Per-EW per-layer budget: never more than S non-empty slots (holds by shape) and every
    # non-empty slot is accounted for by exactly one replica entry.
    assert int((p.contents[l] >= 0).sum()) == int((p.replicas[l] >= 0).sum())
    primaries = np.bincount(p.replicas[l, :, 0] // S, minlength=W)
    assert primaries.sum() == E
    assert primaries.max() - primaries.min() <= 1, primaries.tolist()


@pytest.mark.parametrize("L,E,W,shadows", [(2, 8, 4, 1), (2, 8, 3, 1), (1, 4, 2, 3), (3, 5, 4, 2)])
def test_default_budget_fits_every_requested_shadow(L, E, W, shadows):
  p = place(L, E, W, shadows_per_expert=shadows)
  got = (p.replicas[..., 1:] >= 0).sum(axis=-1)
  np.testing.assert_array_equal(got, np.full((L, E), min(shadows, W - 1)))


def test_primaries_round_robin_rotated_per_layer():
  p = place(2, 8, 4)
  assert p.slots_per_layer == 4
  primary_ew = p.replicas[..., 0] // p.slots_per_layer
  assert primary_ew.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [1, 2, 3, 0, 1, 2, 3, 0]]
  # Each EW holds 2 primaries and 2 shadows per layer: its 4 slots are full.
  assert (p.contents >= 0).all()


def test_eight_experts_over_three_ews_pads_slots():
  p = place(2, 8, 3)
  # ceil(8 / 3) = 3 slots for primaries + ceil(8 * 1 / 3) = 3 for shadows.
  assert p.slots_per_layer == 6
  assert p.contents.shape == (2, 3, 6)
  primaries = [np.bincount(p.replicas[l, :, 0] // 6, minlength=3).tolist() for l in range(2)]
  assert primaries == [[3, 3, 2], [2, 3, 3]]
  # 16 replicas per layer in 18 slots: 2 padded (empty) slots per layer.
  assert (p.contents < 0).sum(axis=(1, 2)).tolist() == [2, 2]
  assert (p.replicas >= 0).sum() == 2 * 8 * 2


def test_tight_budget_places_fewer_shadows():
  p = place(2, 8, 4, slots_per_layer=3)
  # 2 primaries per EW per layer leave 1 free slot on each of 4 EWs: 4 shadows per layer.
  assert (p.replicas[..., 1] >= 0).sum(axis=1).tolist() == [4, 4]
  assert (p.contents >= 0).all()
  assert (p.replicas[..., 0] >= 0).all()


def test_budget_of_primaries_only_places_no_shadows():
  p = place(2, 8, 4, slots_per_layer=2)
  assert (p.replicas[..., 0] >= 0).all()
  assert (p.replicas[..., 1:] == -1).all()


def test_shadows_capped_by_number_of_ews():
  p = place(1, 4, 2, shadows_per_expert=3)
  assert p.replicas.shape == (1, 4, 4)
  assert (p.replicas[..., 1] >= 0).all()
  assert (p.replicas[..., 2:] == -1).all()
  one = place(2, 8, 1)
  assert one.slots_per_layer == 8
  assert (one.replicas[..., 1:] == -1).all()


def test_budget_too_small_for_primaries_names_the_numbers():
  with pytest.raises(ValueError, match=r"slots_per_layer=2") as err:
    place(2, 8, 3, slots_per_layer=2)
  msg = str(err.value)
  assert "8 experts" in msg and "3 EWs" in msg and "at least 3" in msg


@pytest.mark.parametrize(
  "kwargs,needle",
  [
    (dict(num_layers=2, num_experts=8, num_ew=0), "num_ew=0"),
    (dict(num_layers=0, num_experts=8, num_ew=4), "num_layers=0"),
    (dict(num_layers=2, num_experts=0, num_ew=4), "num_experts=0"),
    (dict(num_layers=2, num_experts=8, num_ew=4, shadows_per_expert=-1), "shadows_per_expert=-1"),
  ],
)
def test_bad_arguments_rejected(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    place(**kwargs)


def test_slots_for_budget():
  per_ew_budget = CFG.num_layers * 6 * EXPERT_BYTES  # 6 slots per layer
  assert per_ew_budget == 294_912
  assert slots_for_budget(CFG, per_ew_budget) == 6
  assert slots_for_budget(CFG, per_ew_budget - 1) == 5
  assert slots_for_budget(CFG, 0) == 0
  assert slots_for_budget(CFG.replace(dtype="bfloat16"), per_ew_budget) == 12


def test_budget_from_bytes_too_small_for_primaries():
  slots = slots_for_budget(CFG, CFG.num_layers * 2 * EXPERT_BYTES)
  assert slots == 2
  with pytest.raises(ValueError, match="slots_per_layer=2"):
    place(CFG.num_layers, CFG.num_experts, 3, slots_per_layer=slots)


def test_memory_report_sums():
  p = place(2, 8, 3)
  report = p.memory_report(CFG)
  assert [r["ew"] for r in report] == [0, 1, 2]
  assert [r["primaries"] for r in report] == [5, 6, 5]
  assert [r["shadows"] for r in report] == [6, 4, 6]
  assert sum(r["primaries"] for r in report) == 2 * 8
  assert sum(r["shadows"] for r in report) == 2 * 8
  for r in report:
    assert r["primary_bytes"] == r["primaries"] * EXPERT_BYTES
    assert r["shadow_bytes"] == r["shadows"] * EXPERT_BYTES
    assert r["budget_bytes"] == 2 * 6 * EXPERT_BYTES == 294_912
    assert r["primary_bytes"] + r["shadow_bytes"] <= r["budget_bytes"]
  # Counts agree with the slot table: every non-empty slot is a primary or a shadow.
  held = (p.contents >= 0).sum(axis=(0, 2)).tolist()
  assert held == [r["primaries"] + r["shadows"] for r in report] == [11, 10, 11]


def test_memory_report_within_budget_from_bytes():
  budget = 294_912
  p = place(CFG.num_layers, CFG.num_experts, 4, slots_per_layer=slots_for_budget(CFG, budget))
  for r in p.memory_report(CFG):
    assert r["budget_bytes"] == budget
    assert r["primary_bytes"] + r["shadow_bytes"] <= budget
    assert r["primaries"] == 4  # 2 per layer, 2 layers


def test_placement_tables_are_read_only():
  p = place(2, 8, 4)
  with pytest.raises(ValueError):
    p.replicas[0, 0, 0] = 5
  with pytest.raises(ValueError):
    p.contents[0, 0, 0] = 5
