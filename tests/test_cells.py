"""Carving the 8 CPU devices into attention cells, expert cells and spares."""

from __future__ import annotations

import jax
import pytest

from tarragon_jax.mesh.cells import AXIS, Cell, CellPlan, carve


def _ids(cells) -> list[list[int]]:
  return [[d.id for d in c.devices] for c in cells]


@pytest.mark.parametrize(
  "plan,aw,ew,spares",
  [
    (CellPlan(4, 4), [[0], [1], [2], [3]], [[4], [5], [6], [7]], []),
    (CellPlan(2, 6), [[0], [1]], [[2], [3], [4], [5], [6], [7]], []),
    (CellPlan(1, 1), [[0]], [[1]], [2, 3, 4, 5, 6, 7]),
    (CellPlan(2, 2, 2, 2), [[0, 1], [2, 3]], [[4, 5], [6, 7]], []),
    (CellPlan(1, 2, 2, 1), [[0, 1]], [[2], [3]], [4, 5, 6, 7]),
    (CellPlan(1, 1, 3, 2), [[0, 1, 2]], [[3, 4]], [5, 6, 7]),
  ],
)
def test_carve(plan, aw, ew, spares):
  cells = carve(plan)
  assert _ids(cells.aw) == aw
  assert _ids(cells.ew) == ew
  assert [d.id for d in cells.spares] == spares
  assert [c.name for c in cells.aw] == [f"aw{i}" for i in range(plan.num_aw)]
  assert [c.name for c in cells.ew] == [f"ew{i}" for i in range(plan.num_ew)]
  for c in cells.aw + cells.ew:
    assert c.mesh.axis_names == (AXIS,)
    assert c.mesh.devices.shape == (c.size,)
    assert c.size == len(c.devices)
  assert plan.devices_needed == 8 - len(spares)


def test_cells_are_disjoint():
  cells = carve(CellPlan(2, 2, 2, 2))
  used = [d.id for c in cells.aw + cells.ew for d in c.devices]
  assert sorted(used) == list(range(8))


def test_carve_from_given_devices():
  devices = jax.devices()[4:]
  cells = carve(CellPlan(1, 2), devices)
  assert _ids(cells.aw) == [[4]]
  assert _ids(cells.ew) == [[5], [6]]
  assert [d.id for d in cells.spares] == [7]


def test_cell_shardings_place_arrays_on_the_cell():
  cell = carve(CellPlan(1, 1, 2, 1)).aw[0]
  x = jax.device_put(jax.numpy.zeros((4, 6)), cell.replicated())
  assert {d.id for d in x.devices()} == {0, 1}


@pytest.mark.parametrize(
  "plan,needed",
  [
    (CellPlan(5, 4), 9),
    (CellPlan(4, 4, 2, 1), 12),
    (CellPlan(2, 2, 2, 3), 10),
    (CellPlan(1, 1, 8, 1), 9),
  ],
)
def test_plan_needing_too_many_devices(plan, needed):
  with pytest.raises(ValueError, match=rf"needs {needed} devices") as err:
    carve(plan)
  msg = str(err.value)
  assert "only 8 are available" in msg
  assert f"{plan.num_aw} AW x {plan.devices_per_aw}" in msg
  assert f"{plan.num_ew} EW x {plan.devices_per_ew}" in msg


def test_plan_too_big_for_given_devices():
  with pytest.raises(ValueError, match="needs 3 devices .* only 2 are available"):
    carve(CellPlan(2, 1), jax.devices()[:2])


@pytest.mark.parametrize(
  "field,value",
  [
    ("num_aw", 0),
    ("num_ew", 0),
    ("devices_per_aw", 0),
    ("devices_per_ew", -1),
    ("num_aw", 1.5),
    ("num_ew", "2"),
    ("devices_per_aw", None),
  ],
)
def test_plan_validation(field, value):
  with pytest.raises(ValueError, match=rf"CellPlan: {field}={value!r} must be an int >= 1"):
    CellPlan(**{field: value})


def test_plan_defaults_and_devices_needed():
  assert CellPlan() == CellPlan(4, 4, 1, 1)
  assert CellPlan().devices_needed == 8
  assert CellPlan(3, 2, 2, 1).devices_needed == 8
  assert CellPlan(1, 1).devices_needed == 2


def test_cell_needs_a_device():
  with pytest.raises(ValueError, match="at least one device"):
    Cell("ew9", ())
