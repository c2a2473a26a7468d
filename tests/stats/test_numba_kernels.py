"""The compiled CPU kernel against the NumPy kernel and the float64 reference, on runs that
cross its internal boundaries (one-table/eight-table counting, cache blocks), and the
hand-over to NumPy when it fails."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from stats_reference import reference_row
from tensor_strategies import kernel_runs
from tiers import examples

from gradscope.stats import host_backend, host_kernels, layout, numpy_kernels

numba_kernels = pytest.importorskip("gradscope.stats.numba_kernels", reason="numba is not installed")
numba_loops = pytest.importorskip("gradscope.stats.numba_loops", reason="numba is not installed")

EXACT = [layout.NUMEL, layout.MAX_ABS, layout.ZEROS, layout.NANS, layout.INFS, *range(layout.HIST, layout.ROW_WIDTH)]
B, S = numba_kernels.BLOCK, numba_kernels.SMALL
SIZES = [0, 1, 2, 7, S - 1, S, S + 1, 2 * S + 3, B - 1, B, B + 1, 2 * B + 5]


def runs():
    """Runs whose sizes sit on the kernel's boundaries (see ``kernel_runs``)."""
    return kernel_runs(SIZES)


def reference_rows(values: torch.Tensor, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 reference's rows, and each run's sum of |x| (the scale of its sum's error)."""
    rows = np.zeros((starts.size - 1, layout.ROW_WIDTH))
    abs_sums = np.zeros(starts.size - 1)
    for k, (a, b) in enumerate(itertools.pairwise(starts)):
        ref = reference_row(values[a:b])
        for name in layout.SCALAR_FIELDS:
            rows[k, layout.SCALAR_FIELDS.index(name)] = ref[name]
        rows[k, layout.HIST :] = ref["hist"]
        abs_sums[k] = ref["abs_sum"]
    return rows, abs_sums


def assert_sums_close(actual, expected, abs_sums, rtol):
    """Sums within ``rtol`` of the sum of magnitudes (their error scale). When that sum of
    magnitudes overflows float64, partial sums may leave float64's range or not, by the
    order of addition (±inf, NaN or a finite value): there is no right answer to compare."""
    overflowed = ~np.isfinite(abs_sums)
    with np.errstate(invalid="ignore"):
        close = overflowed | (np.abs(actual - expected) <= rtol * abs_sums)
    assert close.all(), (actual, expected)


@settings(max_examples=examples(150), deadline=None)
@given(runs())
def test_rows_match_the_float64_reference_and_the_numpy_kernel(case):
    values, starts = case
    compiled = numba_kernels.rows(values.numpy(), starts)
    expected, abs_sums = reference_rows(values, starts)
    np.testing.assert_array_equal(compiled[:, EXACT], expected[:, EXACT])
    # float64 accumulation: error below n * 2**-53 of the sum of magnitudes
    assert_sums_close(compiled[:, layout.SUM], expected[:, layout.SUM], abs_sums, 1e-12)
    np.testing.assert_allclose(compiled[:, layout.SUMSQ], expected[:, layout.SUMSQ], rtol=1e-12, atol=0)
    with np.errstate(over="ignore", invalid="ignore"):
        by_numpy = numpy_kernels.packed_rows(values.numpy(), starts, host_backend._Workspace())
    np.testing.assert_array_equal(compiled[:, EXACT], by_numpy[:, EXACT])  # identical where exactness is promised
    assert_sums_close(compiled[:, layout.SUM], by_numpy[:, layout.SUM], abs_sums, 1e-6)
    np.testing.assert_allclose(compiled[:, layout.SUMSQ], by_numpy[:, layout.SUMSQ], rtol=1e-6, atol=0)


def test_the_input_is_not_modified():
    values = torch.randn(3 * B + 7)
    values[::5] = float("nan")
    before = values.clone()
    numba_kernels.rows(values.numpy(), np.array([0, B, values.numel()]))
    assert torch.equal(values.isnan(), before.isnan())
    assert torch.equal(values.nan_to_num(), before.nan_to_num())


def test_a_failing_numba_kernel_hands_over_to_numpy_with_one_warning(monkeypatch):
    monkeypatch.setattr(host_kernels, "_broken", {})
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("LLVM could not compile for this CPU")

    monkeypatch.setattr(numba_kernels, "rows", broken)  # runs of a large tensor
    monkeypatch.setattr(numba_kernels, "tensor_rows", broken)  # small tensors read in place
    tensors = [torch.randn(100), torch.randn(5000)]
    with pytest.warns(RuntimeWarning, match="numba kernel failed.*LLVM could not compile.*NumPy kernel takes over"):
        rows = host_backend.host_rows(tensors, "numba")
    assert calls, "the numba kernel was not asked"
    np.testing.assert_array_equal(rows, host_backend.host_rows(tensors, "numpy"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = host_backend.host_rows(tensors, "numba")  # no second warning, no second try
    np.testing.assert_array_equal(again, rows)
    assert len(calls) == 1
    assert host_backend.fastest_kernel() == "numpy"  # backend="auto" stops choosing it


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_width_dispatchers_pick_the_same_function_in_python_as_compiled(dtype):
    """``_exponents`` and ``_top`` choose by the bits' width: called from Python they must
    give what the compiled driver's overloads give."""
    values = (np.random.default_rng(0).standard_normal(3000) * 1e-3).astype(dtype)
    values[7] = 0.0
    bits = values.view(np.uint32 if dtype == np.float32 else np.uint64)
    width = 256 if dtype == np.float32 else 2048
    counts = np.zeros(width, dtype=np.int64)
    numba_loops._exponents(bits, np.zeros(8 * width, dtype=np.uint32), counts)
    assert counts.sum() == values.size
    assert counts[0] == 1  # the zero
    top = np.array([numba_loops._top(bits)], dtype=bits.dtype).view(dtype)[0]
    assert top == np.abs(values).max()
    row = numba_kernels.rows(values, np.array([0, values.size]))[0]
    assert row[layout.MAX_ABS] == top
