"""The statistic row layout and how rows combine."""

import numpy as np
import pytest

import gradscope
from gradscope.stats import layout


def test_hist_edges_are_binades_from_2_pow_minus_48_to_65536():
    edges = gradscope.HIST_EDGES
    assert edges.shape == (gradscope.NUM_BINS + 1,) == (65,)
    assert edges[0] == 2.0**-48 == pytest.approx(3.5527e-15, rel=1e-4)
    assert edges[-1] == 65536.0
    np.testing.assert_array_equal(edges[1:] / edges[:-1], 2.0)


def test_columns():
    assert layout.ROW_WIDTH == 71
    assert [layout.NUMEL, layout.SUM, layout.SUMSQ, layout.MAX_ABS, layout.ZEROS, layout.NANS, layout.INFS] == list(
        range(7)
    )
    assert layout.HIST == 7
    assert set(layout.COMBINE) == {*layout.SCALAR_FIELDS, "hist"}
    assert [name for name, how in layout.COMBINE.items() if how == "max"] == ["max_abs"]


def test_combine_rows_adds_sums_and_counts_and_takes_max():
    rng = np.random.default_rng(0)
    rows = rng.random((4, layout.ROW_WIDTH))
    combined = layout.combine_rows(rows)
    expected = rows.sum(axis=0)
    expected[layout.MAX_ABS] = rows[:, layout.MAX_ABS].max()
    np.testing.assert_array_equal(combined, expected)


def test_combine_rows_along_a_middle_axis():
    rows = np.arange(2 * 3 * layout.ROW_WIDTH, dtype=np.float64).reshape(2, 3, layout.ROW_WIDTH)
    combined = layout.combine_rows(rows, axis=1)
    assert combined.shape == (2, layout.ROW_WIDTH)
    np.testing.assert_array_equal(combined[:, layout.SUM], rows[:, :, layout.SUM].sum(axis=1))
    np.testing.assert_array_equal(combined[:, layout.MAX_ABS], rows[:, :, layout.MAX_ABS].max(axis=1))


def test_combining_nothing_is_an_empty_tensor():
    np.testing.assert_array_equal(layout.combine_rows(np.zeros((0, layout.ROW_WIDTH))), np.zeros(layout.ROW_WIDTH))


def test_combine_rows_rejects_wrong_widths_and_the_column_axis():
    with pytest.raises(ValueError, match="71 columns"):
        layout.combine_rows(np.zeros((2, 70)))
    with pytest.raises(ValueError, match="column axis"):
        layout.combine_rows(np.zeros((2, layout.ROW_WIDTH)), axis=1)
