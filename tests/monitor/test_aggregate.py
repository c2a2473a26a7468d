"""Per-parameter rows into reported rows (``gradscope.monitor.aggregate``).

``RowGroups.combine`` against a reference written here without the layout module (sums of
the present members' columns, the maximum of their ``max_abs``), over random groupings,
presence and backward orders; ``RowGroups.sum``; the check that every row has a parameter;
``blame_replicas``.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradscope.monitor.aggregate import LayerRows, RowGroups, blame_replicas

WIDTH = 71
MAX_ABS = 3  # the one column combined by maximum
NANS, INFS = 5, 6


def reference(row_of, param_rows, present, order, nonfinite_rank=None, nonfinite_ranks=None) -> dict:
    """Reported rows, one at a time, from their present members."""
    count = int(row_of.max()) + 1
    rows = np.zeros((count, WIDTH))
    row_present = np.zeros(count, dtype=bool)
    row_order = np.full(count, -1, dtype=np.int64)
    rank = np.full(count, -1, dtype=np.int64)
    ranks = np.zeros(count, dtype=np.int64)
    for r in range(count):
        members = [p for p in range(len(row_of)) if row_of[p] == r and present[p]]
        if not members:
            continue
        row_present[r] = True
        rows[r] = sum(param_rows[p] for p in members)
        rows[r, MAX_ABS] = max(param_rows[p, MAX_ABS] for p in members)
        known = [order[p] for p in members if order[p] >= 0]
        row_order[r] = min(known) if known else -1
        if nonfinite_rank is not None:
            blamed = [nonfinite_rank[p] for p in members if nonfinite_rank[p] >= 0]
            rank[r] = min(blamed) if blamed else -1
            ranks[r] = max(nonfinite_ranks[p] for p in members)
    return {"rows": rows, "present": row_present, "order": row_order, "rank": rank, "ranks": ranks}


@st.composite
def steps(draw):
    """A grouping of P parameters into R rows (each row has one or more), and one step's data."""
    rows = draw(st.integers(1, 6))
    params = draw(st.integers(rows, 12))
    extra = draw(st.lists(st.integers(0, rows - 1), min_size=params - rows, max_size=params - rows))
    row_of = np.array(draw(st.permutations([*range(rows), *extra])), dtype=np.int64)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    param_rows = rng.integers(0, 1000, size=(params, WIDTH)).astype(np.float64)  # exact sums in any order
    param_rows[:, MAX_ABS] = rng.random(params) * 10.0 ** rng.integers(-8, 8, params)
    present = np.array(draw(st.lists(st.booleans(), min_size=params, max_size=params)))
    # absent parameters hold whatever: stale values, NaN, Inf... never counted
    absent = ~present
    param_rows[absent] = draw(st.sampled_from([0.0, 5.0, np.nan, np.inf]))
    order = np.array(draw(st.lists(st.integers(-1, params), min_size=params, max_size=params)), dtype=np.int64)
    rank = np.array(draw(st.lists(st.integers(-1, 3), min_size=params, max_size=params)), dtype=np.int64)
    ranks = np.array(draw(st.lists(st.integers(0, 4), min_size=params, max_size=params)), dtype=np.int64)
    return row_of, param_rows, present, order, rank, ranks


@given(steps())
def test_combine_equals_the_reference(step):
    row_of, param_rows, present, order, _, _ = step
    groups = RowGroups(row_of)
    layer = groups.combine(param_rows, present, order)
    expected = reference(row_of, param_rows, present, order)
    assert groups.rows == int(row_of.max()) + 1
    assert isinstance(layer, LayerRows)
    np.testing.assert_array_equal(layer.rows, expected["rows"])
    np.testing.assert_array_equal(layer.present, expected["present"])
    np.testing.assert_array_equal(layer.order, expected["order"])
    assert layer.present.dtype == bool
    assert layer.order.dtype == np.int64
    assert layer.nonfinite_rank is None and layer.nonfinite_ranks is None


@given(steps())
def test_combine_with_ranks_equals_the_reference(step):
    row_of, param_rows, present, order, rank, ranks = step
    layer = RowGroups(row_of).combine(param_rows, present, order, rank, ranks)
    expected = reference(row_of, param_rows, present, order, rank, ranks)
    np.testing.assert_array_equal(layer.rows, expected["rows"])
    np.testing.assert_array_equal(layer.nonfinite_rank, expected["rank"])
    np.testing.assert_array_equal(layer.nonfinite_ranks, expected["ranks"])


def test_a_row_without_present_members_is_absent_and_all_zero():
    row_of = np.array([0, 1, 1, 0, 2])
    param_rows = np.full((5, WIDTH), np.nan)  # absent members' rows must never leak in
    param_rows[0] = 1.0
    param_rows[4] = 2.0
    present = np.array([True, False, False, False, True])
    order = np.array([4, 0, 1, 2, 3])
    layer = RowGroups(row_of).combine(param_rows, present, order)
    np.testing.assert_array_equal(layer.present, [True, False, True])
    np.testing.assert_array_equal(layer.rows[1], np.zeros(WIDTH))
    np.testing.assert_array_equal(layer.rows[0], np.ones(WIDTH))  # member 3 absent: only member 0
    np.testing.assert_array_equal(layer.rows[2], np.full(WIDTH, 2.0))
    np.testing.assert_array_equal(layer.order, [4, -1, 3])  # member 3's order 2 does not count


def test_order_is_the_first_present_member_to_become_final():
    row_of = np.array([1, 0, 1, 0])
    rows = np.zeros((4, WIDTH))
    present = np.array([True, True, True, True])
    layer = RowGroups(row_of).combine(rows, present, np.array([5, -1, 2, 7]))
    np.testing.assert_array_equal(layer.order, [7, 2])  # -1 (unknown) ignored, not a minimum


def test_max_abs_is_a_maximum_and_everything_else_adds():
    rows = np.zeros((3, WIDTH))
    rows[:, 0] = [10, 20, 30]  # numel
    rows[:, 2] = [1.0, 4.0, 9.0]  # sumsq
    rows[:, MAX_ABS] = [0.5, 3.0, 2.0]
    rows[:, 7 + 40] = [1, 2, 3]  # a histogram bin
    layer = RowGroups(np.array([0, 0, 0])).combine(rows, np.ones(3, dtype=bool), np.array([0, 1, 2]))
    assert layer.rows.shape == (1, WIDTH)
    assert layer.rows[0, 0] == 60
    assert layer.rows[0, 2] == 14.0
    assert layer.rows[0, MAX_ABS] == 3.0
    assert layer.rows[0, 47] == 6


def test_nonfinite_counts_only_from_present_members():
    row_of = np.array([0, 0, 1])
    rows = np.zeros((3, WIDTH))
    present = np.array([True, False, False])
    layer = RowGroups(row_of).combine(
        rows, present, np.zeros(3, dtype=np.int64), np.array([3, 1, 0]), np.array([1, 4, 2])
    )
    np.testing.assert_array_equal(layer.nonfinite_rank, [3, -1])
    np.testing.assert_array_equal(layer.nonfinite_ranks, [1, 0])


def test_sum_adds_per_parameter_values_per_row():
    groups = RowGroups(np.array([2, 0, 2, 1, 0]))
    values = np.array([1.0, 10.0, 100.0, 1000.0, 10000.0])
    np.testing.assert_array_equal(groups.sum(values), [10010.0, 1000.0, 101.0])
    pairs = np.stack([values, -values], axis=1)
    np.testing.assert_array_equal(groups.sum(pairs), [[10010.0, -10010.0], [1000.0, -1000.0], [101.0, -101.0]])


@given(steps())
def test_sum_equals_bincount(step):
    row_of, param_rows, *_ = step
    values = param_rows[:, 1]
    values = np.where(np.isfinite(values), values, 1.0)
    expected = np.bincount(row_of, weights=values)
    np.testing.assert_array_equal(RowGroups(row_of).sum(values), expected)


@pytest.mark.parametrize("row_of", [[0, 2], [1, 1], [0, 0, 3, 1], [-1, 0]], ids=str)
def test_a_row_without_a_parameter_is_rejected(row_of):
    with pytest.raises(ValueError, match="every reported row needs at least one parameter"):
        RowGroups(np.array(row_of))


def test_groups_accept_parameters_in_any_row_order():
    groups = RowGroups([1, 0, 1, 2, 0])
    assert groups.rows == 3
    np.testing.assert_array_equal(groups.row_of, [1, 0, 1, 2, 0])
    assert groups.row_of.dtype == np.int64


def layer_rows(nans, infs, present) -> LayerRows:
    rows = np.zeros((len(nans), WIDTH))
    rows[:, NANS] = nans
    rows[:, INFS] = infs
    return LayerRows(rows, np.array(present), np.arange(len(nans), dtype=np.int64))


def test_blame_replicas_blames_the_lowest_culprit_on_non_finite_rows():
    layer = layer_rows(nans=[0, 2, 0, 1], infs=[0, 0, 3, 0], present=[True, True, True, False])
    blamed = blame_replicas(layer, [5, 2, 7])
    np.testing.assert_array_equal(blamed.nonfinite_rank, [-1, 2, 2, -1])  # row 3 is absent
    np.testing.assert_array_equal(blamed.nonfinite_ranks, [0, 3, 3, 0])
    assert blamed.rows is layer.rows
    assert blamed.present is layer.present
    assert blamed.order is layer.order


def test_blame_replicas_without_culprits_reports_an_unknown_rank():
    layer = layer_rows(nans=[1, 0], infs=[0, 0], present=[True, True])
    blamed = blame_replicas(layer, [])
    np.testing.assert_array_equal(blamed.nonfinite_rank, [-1, -1])
    np.testing.assert_array_equal(blamed.nonfinite_ranks, [0, 0])


def test_blame_replicas_on_a_finite_step_blames_nobody():
    layer = layer_rows(nans=[0, 0, 0], infs=[0, 0, 0], present=[True, True, False])
    blamed = blame_replicas(layer, [1])
    np.testing.assert_array_equal(blamed.nonfinite_rank, [-1, -1, -1])
    np.testing.assert_array_equal(blamed.nonfinite_ranks, [0, 0, 0])
