"""The compiled light kernel against the compiled full kernel (scalar columns bit for bit),
the NumPy light kernel (counts, ``max_abs`` and the smallest non-zero ``|x|`` exactly) and
the float64 reference (the smallest non-zero ``|x|``), on runs that cross the blocks."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stats_reference import smallest_nonzero, unscaled
from tensor_strategies import kernel_runs
from tiers import examples

from gradscope.stats import host_backend, layout, numpy_kernels

numba_light_kernels = pytest.importorskip("gradscope.stats.numba_light_kernels", reason="numba is not installed")
numba_kernels = pytest.importorskip("gradscope.stats.numba_kernels", reason="numba is not installed")
numba_loops = pytest.importorskip("gradscope.stats.numba_loops", reason="numba is not installed")

SCALARS = list(range(layout.HIST))
EXACT = [layout.NUMEL, layout.MAX_ABS, layout.ZEROS, layout.NANS, layout.INFS]
B = numba_kernels.BLOCK
SIZES = [0, 1, 2, 7, 8, 9, 1023, 1024, B - 1, B, B + 1, 2 * B + 5]


def bits(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows).view(np.int64)


def expected_smallest(values: torch.Tensor, starts: np.ndarray, inv_scale: float | None) -> np.ndarray:
    """Each run's smallest non-zero finite ``|x|`` after unscaling, from the float64 reference."""
    runs = [values[a:b] for a, b in itertools.pairwise(starts)]
    return np.array([smallest_nonzero(run if inv_scale is None else unscaled(run, inv_scale)) for run in runs])


@settings(max_examples=examples(120), deadline=None)
@given(case=kernel_runs(SIZES), inv_scale=st.sampled_from([None, 2.0**-16, 2.0**3, 1e-30]))
def test_light_rows_are_full_rows_without_the_histogram(case, inv_scale):
    values, starts = case
    light, lowest = numba_light_kernels.light_rows(values.numpy(), starts, inv_scale)
    full = numba_kernels.rows(values.numpy(), starts, inv_scale)
    np.testing.assert_array_equal(bits(light[:, SCALARS]), bits(full[:, SCALARS]))
    assert np.isnan(light[:, layout.HIST :]).all()
    np.testing.assert_array_equal(lowest, expected_smallest(values, starts, inv_scale))
    # The NumPy light kernel, given the values unscaled as the backend hands them over
    scaled = values if inv_scale is None else unscaled(values, inv_scale).to(values.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        by_numpy, numpy_lowest = numpy_kernels.light_packed_rows(scaled.numpy(), starts, host_backend._Workspace())
    np.testing.assert_array_equal(light[:, EXACT], by_numpy[:, EXACT])
    np.testing.assert_array_equal(lowest, numpy_lowest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_whole_tensors_read_in_place_give_the_rows_of_their_concatenation(dtype):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g, dtype=dtype) * 1e-3 for n in (5, 0, B + 3, 100)]
    tensors[2][B + 1] = float("nan")
    tensors[3][7] = 2.0**-100
    sizes = np.array([t.numel() for t in tensors], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    for inv_scale in (None, 2.0**-16):
        in_place = numba_light_kernels.light_tensor_rows(tensors, sizes, inv_scale)
        flat = numba_light_kernels.light_rows(torch.cat(tensors).numpy(), starts, inv_scale)
        for got, expected in zip(in_place, flat, strict=True):
            np.testing.assert_array_equal(bits(got), bits(expected))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_integer_loop_by_width_in_python_as_compiled(dtype):
    """The light kernel's integer loop, ``numba_loops._magnitudes``, picks its width from
    Python as the compiled driver's overload does; it gives the largest magnitude, the
    smallest non-zero one less one (the largest value when all are zero) and the zeros."""
    values = (np.random.default_rng(0).standard_normal(3000) * 1e-3).astype(dtype)
    values[[5, 9]] = [0.0, -0.0]
    values[11] = np.nan
    values[12] = 1e-30
    as_bits = values.view(np.uint32 if dtype == np.float32 else np.int64)
    mask = 0x7FFFFFFF if dtype == np.float32 else 0x7FFFFFFFFFFFFFFF
    top, low, zeros = numba_loops._magnitudes(as_bits)
    assert int(top) == int(np.array(np.nan, dtype=dtype).view(as_bits.dtype)) & mask  # NaN's are the largest
    assert np.array(int(low) + 1, dtype=as_bits.dtype).view(dtype) == dtype(1e-30)
    assert zeros == 2
    _, low, zeros = numba_loops._magnitudes(np.zeros(10, dtype=as_bits.dtype))
    assert (int(low), int(zeros)) == (mask, 10)
