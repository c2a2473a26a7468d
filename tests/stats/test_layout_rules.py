"""The rules declared once in ``gradscope.stats.layout``: how columns combine, and derived values.

``SUM_COLUMNS``/``MAX_COLUMNS`` against ``COMBINE``; ``combine_segments`` against
``combine_rows`` run by run; ``derive`` against formulas written out here, element by
element, including empty rows, absent (NaN) rows and a given ``finite``.
"""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradscope.stats import layout

WIDTH = 71
MAX_ABS_COLUMN = 3


# ---- the declaration ------------------------------------------------------------------


def test_sum_and_max_columns_partition_the_row():
    sums, maxes = layout.SUM_COLUMNS, layout.MAX_COLUMNS
    assert layout.ROW_WIDTH == WIDTH
    assert len(sums) + len(maxes) == WIDTH
    assert set(sums).isdisjoint(maxes)
    assert sorted({*sums, *maxes}) == list(range(WIDTH))
    assert list(sums) == sorted(sums) and list(maxes) == sorted(maxes)


def test_only_max_abs_combines_by_maximum():
    assert list(layout.MAX_COLUMNS) == [MAX_ABS_COLUMN] == [layout.MAX_ABS]
    assert list(layout.SUM_COLUMNS) == [c for c in range(WIDTH) if c != MAX_ABS_COLUMN]


def test_column_sets_agree_with_combine():
    for column, name in enumerate(layout.SCALAR_FIELDS):
        rule = layout.COMBINE[name]
        assert rule in ("sum", "max"), name
        assert (column in layout.SUM_COLUMNS) == (rule == "sum"), name
        assert (column in layout.MAX_COLUMNS) == (rule == "max"), name
    assert layout.COMBINE["hist"] == "sum"
    hist = range(layout.HIST, layout.HIST + layout.NUM_BINS)
    assert set(hist) <= set(layout.SUM_COLUMNS)
    assert layout.HIST + layout.NUM_BINS == WIDTH


# ---- combine_segments -----------------------------------------------------------------


@st.composite
def rows_and_starts(draw):
    """Rows with integer-valued sums (added exactly in any order) and random run boundaries."""
    n = draw(st.integers(1, 14))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = rng.integers(-1000, 1000, size=(n, WIDTH)).astype(np.float64)
    rows[:, MAX_ABS_COLUMN] = rng.random(n) * 10.0 ** rng.integers(-5, 5, n)
    cuts = draw(st.sets(st.integers(1, n - 1), max_size=n - 1)) if n > 1 else set()
    return rows, np.array([0, *sorted(cuts)], dtype=np.int64)


@given(rows_and_starts())
def test_combine_segments_equals_combine_rows_on_each_run(case):
    rows, starts = case
    combined = layout.combine_segments(rows, starts)
    ends = [*starts[1:], len(rows)]
    assert combined.shape == (len(starts), WIDTH)
    for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
        run = rows[start:end]
        np.testing.assert_array_equal(combined[k], layout.combine_rows(run), err_msg=f"run {k}: {start}:{end}")
        # and, written out without the layout: sums everywhere but max_abs, which is a max
        expected = run.sum(axis=0)
        expected[MAX_ABS_COLUMN] = run[:, MAX_ABS_COLUMN].max()
        np.testing.assert_array_equal(combined[k], expected, err_msg=f"run {k}")


def test_combine_segments_single_row_runs_are_the_rows():
    rows = np.arange(3 * WIDTH, dtype=np.float64).reshape(3, WIDTH)
    np.testing.assert_array_equal(layout.combine_segments(rows, np.array([0, 1, 2])), rows)


def test_overflowing_sums_are_inf_without_a_floating_point_error():
    rows = np.zeros((2, WIDTH))
    rows[:, layout.SUMSQ] = 1e308
    rows[:, MAX_ABS_COLUMN] = 1e308
    with np.errstate(all="raise"):
        segments = layout.combine_segments(rows, np.array([0]))
        whole = layout.combine_rows(rows)
    assert segments[0, layout.SUMSQ] == whole[layout.SUMSQ] == np.inf
    assert segments[0, MAX_ABS_COLUMN] == whole[MAX_ABS_COLUMN] == 1e308


def test_combine_segments_rejects_wrong_widths():
    with pytest.raises(ValueError, match="71 columns"):
        layout.combine_segments(np.zeros((3, 70)), np.array([0, 2]))


# ---- derive ---------------------------------------------------------------------------

ALL_DERIVED = (*layout.DERIVED_FIELDS, "rms_nonzero")


def reference(name: str, numel, total, sumsq, zeros, nans, infs, finite=None) -> float:
    """One derived value of one row, written out with ``math`` (the documented formulas)."""
    if finite is None:
        finite = numel - nans - infs
    if name == "finite":
        return finite
    if name == "nonfinite":
        return nans + infs
    if name == "norm":
        return math.sqrt(sumsq)
    if name == "rms":
        return math.sqrt(sumsq / finite) if finite > 0 else 0.0
    if name == "mean":
        return total / finite if finite > 0 else 0.0
    if name == "zero_frac":
        return zeros / numel if numel > 0 else 0.0
    if name == "rms_nonzero":
        nonzero = finite - zeros
        return math.sqrt(sumsq / nonzero) if nonzero > 0 else math.nan
    raise AssertionError(name)


COLUMNS = ("numel", "sum", "sumsq", "zeros", "nans", "infs")

# numel, sum, sumsq, zeros, nans, infs
ROWS = [
    (10, 3.0, 20.0, 2, 1, 1),  # an ordinary row
    (0, 0.0, 0.0, 0, 0, 0),  # zero elements
    (4, 0.0, 0.0, 4, 0, 0),  # all zeros
    (3, 0.0, 0.0, 0, 2, 1),  # nothing finite
    (5, -7.5, 30.25, 0, 0, 0),  # no zeros, negative sum
    (1, 2.0, 4.0, 0, 0, 0),  # one element
]


def fields_of(rows) -> dict:
    table = np.array(rows, dtype=np.float64)
    return {name: table[:, i] for i, name in enumerate(COLUMNS)}


def test_derived_fields_are_the_documented_names():
    assert layout.DERIVED_FIELDS == ("norm", "rms", "mean", "zero_frac", "nonfinite", "finite")


@pytest.mark.parametrize("name", ALL_DERIVED)
def test_derive_matches_the_formulas(name):
    values = layout.derive(name, fields_of(ROWS))
    expected = [reference(name, *row) for row in ROWS]
    assert values.shape == (len(ROWS),)
    np.testing.assert_array_equal(values, expected)


def test_zero_element_and_all_nonfinite_rows():
    empty, nothing_finite = fields_of([ROWS[1]]), fields_of([ROWS[3]])
    for fields in (empty, nothing_finite):
        assert layout.derive("rms", fields)[0] == 0.0
        assert layout.derive("mean", fields)[0] == 0.0
        assert np.isnan(layout.derive("rms_nonzero", fields)[0])
    assert layout.derive("zero_frac", empty)[0] == 0.0
    assert layout.derive("norm", empty)[0] == 0.0
    assert layout.derive("nonfinite", nothing_finite)[0] == 3
    assert layout.derive("finite", nothing_finite)[0] == 0


def test_all_zero_row_has_no_nonzero_rms():
    fields = fields_of([ROWS[2]])
    assert layout.derive("zero_frac", fields)[0] == 1.0
    assert layout.derive("rms", fields)[0] == 0.0
    assert np.isnan(layout.derive("rms_nonzero", fields)[0])


@st.composite
def count_rows(draw):
    numel = draw(st.integers(0, 10**6))
    nans = draw(st.integers(0, numel))
    infs = draw(st.integers(0, numel - nans))
    zeros = draw(st.integers(0, numel - nans - infs))
    magnitude = st.floats(0, 1e30, allow_nan=False)
    total = draw(st.floats(-1e30, 1e30, allow_nan=False)) if numel - nans - infs else 0.0
    sumsq = draw(magnitude) if numel - nans - infs - zeros else 0.0
    return numel, total, sumsq, zeros, nans, infs


@given(st.lists(count_rows(), min_size=1, max_size=8))
def test_derive_matches_the_formulas_on_random_rows(rows):
    fields = fields_of(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # empty rows must not warn (division by zero, 0/0)
        for name in ALL_DERIVED:
            expected = [reference(name, *row) for row in rows]
            np.testing.assert_array_equal(layout.derive(name, fields), expected, err_msg=name)


@pytest.mark.parametrize("name", ALL_DERIVED)
def test_nan_inputs_stay_nan(name):
    """Absent rows are NaN in the history; whatever is derived from them is NaN too."""
    fields = fields_of([ROWS[0], ROWS[0]])
    for column in COLUMNS:
        fields[column][1] = np.nan
    values = layout.derive(name, fields)
    assert np.isnan(values[1]), name
    assert values[0] == reference(name, *ROWS[0])


def test_a_given_finite_is_used_as_is():
    fields = fields_of([ROWS[0], ROWS[4]])  # computed finite would be 8 and 5
    given_finite = np.array([4.0, 2.0])
    fields["finite"] = given_finite
    assert layout.derive("finite", fields) is given_finite
    for name in ("rms", "mean", "rms_nonzero"):
        expected = [reference(name, *row, finite=f) for row, f in zip((ROWS[0], ROWS[4]), given_finite, strict=True)]
        np.testing.assert_array_equal(layout.derive(name, fields), expected, err_msg=name)
    assert layout.derive("rms", fields)[0] == math.sqrt(20.0 / 4.0)
    assert layout.derive("mean", fields)[1] == -7.5 / 2.0


def test_a_given_column_is_returned_and_two_dimensional_fields_keep_their_shape():
    rng = np.random.default_rng(4)
    shape = (3, 5)  # (steps, layers), as the history holds them
    numel = rng.integers(1, 100, shape).astype(np.float64)
    fields = {
        "numel": numel,
        "sum": rng.standard_normal(shape),
        "sumsq": rng.random(shape),
        "zeros": np.zeros(shape),
        "nans": np.zeros(shape),
        "infs": np.zeros(shape),
    }
    assert layout.derive("sumsq", fields) is fields["sumsq"]
    rms = layout.derive("rms", fields)
    assert rms.shape == shape
    np.testing.assert_allclose(rms, np.sqrt(fields["sumsq"] / numel), rtol=1e-15)


def test_integer_counts_give_integer_counts():
    fields = {"numel": np.array([5, 7]), "nans": np.array([1, 0]), "infs": np.array([2, 7])}
    finite = layout.derive("finite", fields)
    assert finite.dtype == np.int64
    np.testing.assert_array_equal(finite, [2, 0])
    np.testing.assert_array_equal(layout.derive("nonfinite", fields), [3, 7])


@pytest.mark.parametrize("name", ["bogus", "RMS", "hist", ""])
def test_derive_rejects_unknown_names(name):
    with pytest.raises(KeyError, match="is neither a statistics column given nor a derived value"):
        layout.derive(name, fields_of(ROWS))


def test_derive_names_a_missing_input_column():
    with pytest.raises(KeyError, match="'sumsq'"):
        layout.derive("rms", {"numel": np.ones(1), "nans": np.zeros(1), "infs": np.zeros(1)})
