"""The CPU backend, with each of its kernels, against the float64 reference, on every dtype,
value and layout (``make test`` installs numba, so both kernels run here; without it the
numba cases skip, saying so)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stats_reference import assert_matches_reference, unscaled
from tensor_strategies import gradient_tensors, many_small_and_a_few_large
from tiers import examples

from gradscope import TensorStats
from gradscope.stats import host_backend


def cpu_stats(tensors, kernel, num_threads=None, inv_scale=None) -> TensorStats:
    rows = host_backend.host_rows(tensors, kernel, num_threads=num_threads, inv_scale=inv_scale)
    return TensorStats.from_rows(rows)


@settings(max_examples=examples(300))
@given(st.lists(gradient_tensors(), min_size=1, max_size=6))
def test_matches_reference(kernel, tensors):
    assert_matches_reference(cpu_stats(tensors, kernel), tensors)


@settings(max_examples=examples(200))
@given(tensors=st.lists(gradient_tensors(), min_size=1, max_size=8), threads=st.integers(1, 4))
def test_matches_reference_across_chunks_packs_and_threads(kernel, small_work_items, tensors, threads):
    assert_matches_reference(cpu_stats(tensors, kernel, num_threads=threads), tensors)


@settings(max_examples=examples(100))
@given(tensors=many_small_and_a_few_large(), threads=st.integers(1, 3))
def test_many_small_tensors_around_large_ones(kernel, small_work_items, tensors, threads):
    assert_matches_reference(cpu_stats(tensors, kernel, num_threads=threads), tensors)


@settings(max_examples=examples(100))
@given(
    tensors=st.lists(gradient_tensors(), min_size=1, max_size=8),
    inv_scale=st.sampled_from([2.0**-16, 2.0**-24, 2.0**3, 1 / 3, 1e-30]),
)
def test_statistics_of_unscaled_gradients(kernel, small_work_items, tensors, inv_scale):
    """With inv_scale, the statistics are those of g * inv_scale computed as GradScaler does."""
    expected = [unscaled(t, inv_scale) for t in tensors]
    assert_matches_reference(cpu_stats(tensors, kernel, num_threads=2, inv_scale=inv_scale), expected)


@given(st.lists(gradient_tensors(), min_size=1, max_size=8))
def test_result_does_not_depend_on_threads(kernel, small_work_items, tensors):
    one = cpu_stats(tensors, kernel, num_threads=1).to_rows()
    for threads in (2, 3):
        np.testing.assert_array_equal(cpu_stats(tensors, kernel, num_threads=threads).to_rows(), one)


def test_large_tensor_with_default_chunking(kernel):
    """A tensor spanning several default-sized work items, read on two threads."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3 * host_backend.CHUNK + 123, generator=g) * 1e-3
    big[::7] = 0
    big[5] = float("nan")
    tensors = [big, torch.randn(100, generator=g).to(torch.bfloat16)]
    assert_matches_reference(cpu_stats(tensors, kernel, num_threads=2), tensors)


def test_zeros_are_told_apart_from_subnormals(kernel):
    subnormal = torch.tensor(1e-45, dtype=torch.float32)
    assert subnormal != 0
    x = torch.stack([torch.tensor(0.0), torch.tensor(-0.0), subnormal, -subnormal, torch.tensor(1.0)])
    stats = cpu_stats([x], kernel)
    assert stats.zeros[0] == 2
    assert stats.hist[0, 0] == 2  # the subnormals, in the lowest bin
    assert stats.max_abs[0] == 1.0


def test_huge_finite_values_do_not_overflow_the_sums(kernel):
    x = torch.tensor([3e38, 3e38, -1e38], dtype=torch.float32)
    stats = cpu_stats([x], kernel)
    assert stats.sumsq[0] == pytest.approx(float(x.double().square().sum()), rel=1e-6)
    assert stats.sum[0] == pytest.approx(5e38, rel=1e-6)
    assert stats.nans[0] == stats.infs[0] == 0


def test_tiny_values_keep_their_sum_of_squares(kernel):
    x = torch.full((1000,), 1e-30, dtype=torch.float32)  # squares underflow in float32
    stats = cpu_stats([x], kernel)
    assert stats.sumsq[0] == pytest.approx(1000 * float(x[0].double()) ** 2, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_copied_chunk_by_chunk(kernel):
    x = torch.randn(10_000, device="cuda", dtype=torch.bfloat16)
    assert_matches_reference(cpu_stats([x], kernel), [x])


def test_without_numba_everything_runs_on_numpy_and_asking_for_numba_says_how_to_get_it():
    """A machine without numba (the core install): ``auto`` takes the NumPy kernel without a
    word, ``watch`` and ``grad_stats`` work, and ``backend="numba"`` is a clear error."""
    code = """
import sys, warnings
sys.modules["numba"] = None  # import numba -> ImportError, as where it is not installed
warnings.simplefilter("error")
import torch, gradscope
from gradscope.stats import dispatch, host_backend
assert host_backend.fastest_kernel() == "numpy", host_backend.fastest_kernel()
assert dispatch.engine_for(torch.device("cpu"), "auto") == "numpy"
model = torch.nn.Linear(4, 2)
with gradscope.watch(model) as mon:
    model(torch.randn(8, 4)).square().mean().backward()
    mon.step()
    assert list(mon._engines.captures) == ["numpy"]
    assert mon.history("norm").values.shape == (1, 1)
try:
    gradscope.grad_stats([torch.randn(3)], backend="numba")
except ValueError as error:
    print(error)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "backend='numba' needs the numba package (pip install 'gradscope[numba]')" in done.stdout


@settings(max_examples=examples(60))
@given(tensors=st.lists(gradient_tensors(max_numel=300), min_size=2, max_size=12))
def test_a_small_tensors_row_does_not_depend_on_the_tensors_beside_it(kernel, tensors):
    """Measured together (one pack) or one at a time (as a worker does in backward mode),
    each tensor's row is the same, bit for bit: backward and step mode must agree."""
    together = cpu_stats(tensors, kernel).to_rows()
    alone = np.concatenate([cpu_stats([t], kernel).to_rows() for t in tensors])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(cpu_stats(tensors[::-1], kernel).to_rows(), together[::-1])
