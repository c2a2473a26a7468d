"""The NumPy kernel's light rows against its full rows (scalar columns bit for bit, one run
or many packed) and the smallest non-zero ``|x|`` against the float64 reference."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from stats_reference import smallest_nonzero
from tensor_strategies import kernel_runs
from tiers import examples

from gradscope.stats import host_backend, layout, numpy_kernels

SCALARS = list(range(layout.HIST))
SIZES = [0, 1, 2, 3, 255, 256, 257, 1000]


def bits(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows).view(np.int64)


def ws():
    return host_backend._Workspace()


@settings(max_examples=examples(150))
@given(kernel_runs(SIZES))
def test_light_rows_are_full_rows_without_the_histogram(case):
    values, starts = case
    values = values.numpy()
    expected_smallest = [smallest_nonzero(torch.from_numpy(values[a:b])) for a, b in itertools.pairwise(starts)]
    with np.errstate(over="ignore", invalid="ignore"):
        light, lowest = numpy_kernels.light_packed_rows(values, starts, ws())
        full = numpy_kernels.packed_rows(values, starts, ws())
        runs = [
            (numpy_kernels.light_run_row(values[a:b], ws()), numpy_kernels.run_row(values[a:b], ws()))
            for a, b in itertools.pairwise(starts)
        ]
    np.testing.assert_array_equal(bits(light[:, SCALARS]), bits(full[:, SCALARS]))
    assert np.isnan(light[:, layout.HIST :]).all()
    np.testing.assert_array_equal(lowest, expected_smallest)
    for k, ((run_light, run_lowest), run_full) in enumerate(runs):
        np.testing.assert_array_equal(bits(run_light[:, SCALARS]), bits(run_full[:, SCALARS]), err_msg=f"run {k}")
        assert np.isnan(run_light[:, layout.HIST :]).all()
        assert run_lowest[0] == expected_smallest[k], f"run {k}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("values", "lowest"),
    [
        ([0.0, -0.0, 0.0], np.inf),  # only zeros: no non-zero value, and max |x| is +0.0
        ([-0.0] * 300, np.inf),
        ([np.nan, -np.inf, np.inf], np.inf),  # nothing finite
        ([np.nan, 0.0, 3.0, -0.5, np.inf], 0.5),
        ([1e-30, 0.0, -1e-30], 1e-30),
    ],
    ids=["zeros", "negative-zeros", "non-finite", "mixed", "tiny"],
)
def test_runs_without_an_ordinary_value(dtype, values, lowest):
    run = np.array(values, dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        (light,), (found,) = numpy_kernels.light_run_row(run, ws())
        (full,) = numpy_kernels.run_row(run, ws())
        (packed,), (packed_found,) = numpy_kernels.light_packed_rows(run, np.array([0, run.size]), ws())
        (packed_full,) = numpy_kernels.packed_rows(run, np.array([0, run.size]), ws())
    assert found == packed_found == dtype(lowest)
    np.testing.assert_array_equal(bits(light[SCALARS]), bits(full[SCALARS]))
    np.testing.assert_array_equal(bits(packed[SCALARS]), bits(packed_full[SCALARS]))
    assert bits(light[[layout.MAX_ABS]])[0] >= 0  # +0.0 or more, never -0.0
