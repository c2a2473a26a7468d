"""TensorStats: fields, derived quantities against torch, combining, export."""

import json

import numpy as np
import pytest
import torch

import gradscope
from gradscope import TensorStats
from gradscope.stats import layout


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100, 7, generator=g)
    a[0, :3] = 0
    b = torch.tensor([1.0, float("nan"), -3.0, float("inf"), 0.0])
    return [a, b, torch.empty(0)]


def test_derived_quantities_match_torch(tensors):
    stats = gradscope.grad_stats(tensors)
    a, b, _ = tensors
    finite_b = b[torch.isfinite(b)]
    assert stats.norm[0] == pytest.approx(float(a.double().norm()), rel=1e-6)
    assert stats.rms[0] == pytest.approx(float(a.double().square().mean().sqrt()), rel=1e-6)
    assert stats.mean[0] == pytest.approx(float(a.double().mean()), rel=1e-5, abs=1e-9)
    assert stats.zero_frac[0] == pytest.approx(3 / 700)
    assert stats.norm[1] == pytest.approx(float(finite_b.norm()))
    assert stats.rms[1] == pytest.approx(float(finite_b.square().mean().sqrt()))
    assert stats.mean[1] == pytest.approx(float(finite_b.mean()))
    assert stats.nonfinite[1] == 2
    assert stats.finite[1] == 3
    assert stats.total_norm == pytest.approx(float(torch.cat([a.reshape(-1), finite_b]).double().norm()), rel=1e-6)


def test_empty_tensor_is_all_zeros_not_nan(tensors):
    stats = gradscope.grad_stats(tensors)
    for name in ("numel", "sum", "sumsq", "max_abs", "zeros", "nans", "infs", "norm", "rms", "mean", "zero_frac"):
        assert getattr(stats, name)[2] == 0, name
    assert stats.hist[2].sum() == 0


def test_field_dtypes_and_shapes(tensors):
    stats = gradscope.grad_stats(tensors)
    for name in ("numel", "zeros", "nans", "infs"):
        assert getattr(stats, name).dtype == np.int64
        assert getattr(stats, name).shape == (3,)
    for name in ("sum", "sumsq", "max_abs"):
        assert getattr(stats, name).dtype == np.float64
    assert stats.hist.shape == (3, 64)
    assert stats.hist.dtype == np.int64
    assert len(stats) == 3


def test_rows_round_trip(tensors):
    stats = gradscope.grad_stats(tensors)
    again = TensorStats.from_rows(stats.to_rows())
    np.testing.assert_array_equal(again.to_rows(), stats.to_rows())


def test_combined_equals_stats_of_the_concatenation(tensors):
    stats = gradscope.grad_stats(tensors).combined()
    whole = gradscope.grad_stats([torch.cat([t.reshape(-1) for t in tensors])])
    np.testing.assert_array_equal(stats.hist, whole.hist)
    for name in ("numel", "zeros", "nans", "infs", "max_abs"):
        assert getattr(stats, name)[0] == getattr(whole, name)[0], name
    assert stats.sumsq[0] == pytest.approx(whole.sumsq[0], rel=1e-12)


def test_to_dict_is_plain_json(tensors):
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    data = gradscope.grad_stats(model).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["names"] == ["weight", "bias"]
    assert len(data["hist"][0]) == 64
    assert set(data) >= {"norm", "rms", "mean", "zero_frac", "nonfinite", *layout.SCALAR_FIELDS}


def test_repr_lists_every_tensor(tensors):
    text = repr(gradscope.grad_stats(tensors))
    assert text.startswith("TensorStats(3 tensors")
    assert len(text.splitlines()) == 2 + 3


def test_from_rows_checks_shapes():
    with pytest.raises(ValueError, match="shape"):
        TensorStats.from_rows(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="names"):
        TensorStats.from_rows(np.zeros((2, layout.ROW_WIDTH)), names=("a",))


def light_rows() -> np.ndarray:
    """Rows of three tensors: a histogram known (4 values in bin 5), one unknown, and an
    empty tensor's unknown histogram."""
    rows = np.zeros((3, layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = [4, 2, 0]
    rows[:, layout.SUMSQ] = [1.0, 2.0, 0.0]
    rows[0, layout.HIST + 5] = 4
    rows[1:, layout.HIST :] = layout.NO_HISTOGRAM
    return rows


def test_unknown_histograms_are_marked_and_round_trip():
    stats = TensorStats.from_rows(light_rows())
    assert stats.hist_known.dtype == bool
    assert stats.hist_known.tolist() == [True, False, False]
    assert stats.hist.dtype == np.int64 and stats.hist.shape == (3, 64)
    assert stats.hist[0, 5] == 4 and stats.hist.sum() == 4  # unknown rows: zeros, never NaN cast to int
    np.testing.assert_array_equal(stats.to_rows(), light_rows())  # NaN where they were
    again = TensorStats.from_rows(stats.to_rows())
    np.testing.assert_array_equal(again.hist_known, stats.hist_known)
    np.testing.assert_array_equal(again.to_rows(), light_rows())
    assert stats.to_dict()["hist_known"] == [True, False, False]


def test_a_combined_histogram_is_known_only_if_every_part_is():
    stats = TensorStats.from_rows(light_rows())
    assert not stats.combined().hist_known[0]
    assert stats.combined().sumsq[0] == 3.0
    known_only = TensorStats.from_rows(light_rows()[:1])
    assert known_only.combined().hist_known[0]


def test_built_without_hist_known_every_histogram_is_known(tensors):
    stats = gradscope.grad_stats(tensors)
    assert stats.hist_known.tolist() == [True, True, True]
    fields = [getattr(stats, name) for name in (*layout.SCALAR_FIELDS, "hist")]
    built = TensorStats(*fields, names=("a", "b", "c"))
    assert built.hist_known.tolist() == [True, True, True]
    np.testing.assert_array_equal(built.to_rows(), stats.to_rows())
    assert not np.isnan(built.to_rows()).any()
