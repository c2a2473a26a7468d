"""Light rows from the CPU backend (``host_rows(..., histogram=False)``), with each kernel.

A light row holds the full row's scalar columns bit for bit and NaN histogram columns,
except for a tensor that triggers (NaN/Inf, a non-zero ``|g|`` below 2**-63, a finite
``|g|`` from 2**56 up, after unscaling, in any slice of it), whose row is its full row.
Expected triggers come from the rule written out in ``stats_reference``, on values
unscaled there; results may depend on neither threads nor packs.
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stats_reference import triggers_histogram, unscaled
from tensor_strategies import gradient_tensors
from tiers import examples

from gradscope.stats import host_backend, host_kernels, layout

SCALARS = list(range(layout.HIST))
SLICE = 512  # elements per work item under the small_work_items fixture
INV_SCALES = [None, 2.0**-16, 2.0**-24, 2.0**3, 1e-30]
_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def bits(rows: np.ndarray) -> np.ndarray:
    """Rows as int64 bit patterns: equal means bit for bit (NaN included, -0.0 apart from 0.0)."""
    return np.ascontiguousarray(rows).view(np.int64)


def light_and_full(tensors, kernel, **options) -> tuple[np.ndarray, np.ndarray]:
    light = host_backend.host_rows(tensors, kernel, histogram=False, **options)
    full = host_backend.host_rows(tensors, kernel, **options)
    return light, full


def assert_light_rows(light: np.ndarray, full: np.ndarray, triggered) -> None:
    """Scalar columns as the full rows' bit for bit; the triggered rows (bool ``(T,)``) are
    their full rows, every other row's histogram is NaN."""
    np.testing.assert_array_equal(bits(light[:, SCALARS]), bits(full[:, SCALARS]))
    known = layout.histogram_known(light)
    np.testing.assert_array_equal(known, np.asarray(triggered, dtype=bool), err_msg="which rows have a histogram")
    np.testing.assert_array_equal(bits(light[known]), bits(full[known]))
    assert np.isnan(light[~known, layout.HIST :]).all()


def gradient_like(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal noise of scale 1e-3 with a few zeros: far from every trigger, even unscaled by 2**-24."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e-3
    x[::13] = 0
    return x.to(dtype)


def below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value below the positive ``value`` (exactly representable in ``dtype``)."""
    pattern = torch.tensor(value, dtype=dtype).view(_INT[dtype]) - 1
    return float(pattern.view(dtype))


def model_of(dtype: torch.dtype) -> list[torch.Tensor]:
    """A small packed tensor, a large one cut into four slices, and two more around them."""
    sizes = (50, 4 * SLICE, 7, 3 * SLICE + 100)
    return [gradient_like(numel, dtype, seed) for seed, numel in enumerate(sizes, start=1)]


@pytest.mark.parametrize("inv_scale", [None, 2.0**-16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_light_rows_are_the_full_rows_without_their_histograms(kernel, small_work_items, dtype, inv_scale):
    tensors = model_of(dtype)
    light, full = light_and_full(tensors, kernel, num_threads=2, inv_scale=inv_scale)
    assert_light_rows(light, full, [False] * len(tensors))
    assert layout.histogram_known(full).all()


TRIGGERS = [
    ("nan", float("nan"), (torch.float32, torch.float64, torch.bfloat16, torch.float16)),
    ("+inf", float("inf"), (torch.float32, torch.float64, torch.bfloat16, torch.float16)),
    ("2**-70", 2.0**-70, (torch.float32, torch.float64, torch.bfloat16)),
    ("subnormal", "subnormal", (torch.float32, torch.float64, torch.bfloat16)),
    ("-2**60", -(2.0**60), (torch.float32, torch.float64, torch.bfloat16)),
]
TRIGGER_CASES = [
    pytest.param(value, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}")
    for name, value, dtypes in TRIGGERS
    for dtype in dtypes
]


@pytest.mark.parametrize(("value", "dtype"), TRIGGER_CASES)
@pytest.mark.parametrize("where", ["third slice of a large tensor", "a small packed tensor"])
def test_a_trigger_anywhere_in_a_tensor_gives_that_tensor_its_full_row(kernel, small_work_items, value, dtype, where):
    if value == "subnormal":
        value = torch.finfo(dtype).tiny / 4  # below the smallest normal: a subnormal, and tiny
        assert 0 < value < 2.0**-63 and torch.tensor(value, dtype=dtype) != 0
    tensors = model_of(dtype)
    target, index = (1, 2 * SLICE + 17) if where.startswith("third") else (0, 30)
    tensors[target][index] = value
    light, full = light_and_full(tensors, kernel, num_threads=2)
    assert_light_rows(light, full, [i == target for i in range(len(tensors))])


@pytest.mark.parametrize(
    ("value", "dtype", "inv_scale"),
    [
        (2.0**-50, torch.float32, 2.0**-16),  # 2**-66: tiny only once unscaled
        (2.0**-24, torch.float16, 2.0**-40),  # float16's smallest subnormal, unscaled in float32
        (2.0**50, torch.bfloat16, 2.0**8),  # huge only once unscaled
        (2.0**-50, torch.float64, 2.0**-16),
    ],
    ids=str,
)
def test_a_trigger_made_by_unscaling(kernel, small_work_items, value, dtype, inv_scale):
    tensors = model_of(dtype)
    tensors[3][SLICE + 5] = value
    light, full = light_and_full(tensors, kernel, num_threads=2, inv_scale=inv_scale)
    assert_light_rows(light, full, [False, False, False, True])
    light, full = light_and_full(tensors, kernel, num_threads=2)
    assert_light_rows(light, full, [False, False, False, False])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_the_bounds_of_the_rule(kernel, small_work_items, dtype):
    """2**-63 itself and the largest value below 2**56 are inside (no histogram); the value
    just below 2**-63 and 2**56 itself are outside; signs do not matter; nor does whether
    a value is on a bound before or after unscaling."""
    inside = [2.0**-63, -(2.0**-63), below(2.0**56, dtype), -below(2.0**56, dtype)]
    outside = [below(2.0**-63, dtype), -below(2.0**-63, dtype), 2.0**56, -(2.0**56)]
    tensors = []
    for value in inside + outside:
        tensor = gradient_like(2 * SLICE, dtype, 5)
        tensor[SLICE + 1] = value
        tensors.append(tensor)
    light, full = light_and_full(tensors, kernel, num_threads=2)
    assert_light_rows(light, full, [False] * len(inside) + [True] * len(outside))
    on_bound_once_unscaled = [gradient_like(100, dtype, 6), gradient_like(100, dtype, 7)]
    on_bound_once_unscaled[0][3] = 2.0**-47  # * 2**-16 = 2**-63: inside
    on_bound_once_unscaled[1][3] = below(2.0**-47, dtype)  # just below 2**-63 once unscaled
    light, full = light_and_full(on_bound_once_unscaled, kernel, inv_scale=2.0**-16)
    assert_light_rows(light, full, [False, True])


@settings(max_examples=examples(150))
@given(
    tensors=st.lists(gradient_tensors(), min_size=1, max_size=8),
    threads=st.integers(1, 3),
    inv_scale=st.sampled_from(INV_SCALES),
)
def test_light_rows_follow_the_rule_on_any_tensors(kernel, small_work_items, tensors, threads, inv_scale):
    expected = [triggers_histogram(t if inv_scale is None else unscaled(t, inv_scale)) for t in tensors]
    light, full = light_and_full(tensors, kernel, num_threads=threads, inv_scale=inv_scale)
    assert_light_rows(light, full, expected)


@settings(max_examples=examples(60))
@given(tensors=st.lists(gradient_tensors(max_numel=1500), min_size=2, max_size=10))
def test_light_rows_depend_on_neither_threads_nor_packs(kernel, small_work_items, tensors):
    one = host_backend.host_rows(tensors, kernel, num_threads=1, histogram=False)
    for threads in (2, 3):
        np.testing.assert_array_equal(
            bits(host_backend.host_rows(tensors, kernel, threads, histogram=False)), bits(one)
        )
    alone = np.concatenate([host_backend.host_rows([t], kernel, histogram=False) for t in tensors])
    np.testing.assert_array_equal(bits(alone), bits(one))
    backwards = host_backend.host_rows(tensors[::-1], kernel, num_threads=2, histogram=False)
    np.testing.assert_array_equal(bits(backwards), bits(one[::-1]))


def test_sparse_and_empty_tensors(kernel):
    """Unstored zeros are elements and zeros in light rows as in full ones, and count in a
    triggered row; an empty tensor triggers nothing (its histogram is unknown, not empty)."""
    indices = torch.tensor([[0, 3, 3], [1, 0, 2]])
    quiet = torch.sparse_coo_tensor(indices, torch.tensor([1.0, -2.0, 0.5]), (5, 4), check_invariants=True)
    loud = torch.sparse_coo_tensor(indices, torch.tensor([1.0, float("inf"), 0.5]), (5, 4), check_invariants=True)
    tensors = [quiet, loud, torch.empty(0), torch.empty(3, 0, dtype=torch.bfloat16)]
    light, full = light_and_full(tensors, kernel)
    assert_light_rows(light, full, [False, True, False, False])
    assert light[0, layout.NUMEL] == 20 and light[0, layout.ZEROS] == 17
    assert light[1, layout.ZEROS] == 17 and light[1, layout.INFS] == 1
    assert (light[2:, SCALARS] == 0).all()


def test_a_failing_numba_light_kernel_hands_over_to_numpy_with_one_warning(monkeypatch):
    numba_light_kernels = pytest.importorskip("gradscope.stats.numba_light_kernels", reason="numba is not installed")
    monkeypatch.setattr(host_kernels, "_broken", {})

    def broken(*args):
        raise RuntimeError("LLVM could not compile for this CPU")

    monkeypatch.setattr(numba_light_kernels, "light_rows", broken)
    monkeypatch.setattr(numba_light_kernels, "light_tensor_rows", broken)
    tensors = [torch.randn(100), torch.randn(5000), torch.tensor([1.0, float("nan")])]
    with pytest.warns(RuntimeWarning, match="numba kernel failed.*LLVM could not compile.*NumPy kernel takes over"):
        rows = host_backend.host_rows(tensors, "numba", histogram=False)
    np.testing.assert_array_equal(bits(rows), bits(host_backend.host_rows(tensors, "numpy", histogram=False)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = host_backend.host_rows(tensors, "numba", histogram=False)  # no second warning, no second try
    np.testing.assert_array_equal(bits(again), bits(rows))
