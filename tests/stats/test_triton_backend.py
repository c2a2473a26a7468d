"""The Triton backend's glue (``gradscope.stats.triton_backend``), run in Triton's CPU interpreter.

``triton_rows`` against the NumPy backend on tiny tensors of mixed dtypes, ``launch_rows``
writing only its rows with one launch per dtype, ``inv_scale`` unscaling, and ``serves``.
Compiled (CUDA) sessions skip this module: the kernel tests cover the GPU.
"""

import numpy as np
import pytest
import torch

import gradscope
from gradscope.stats import layout, triton_backend
from gradscope.stats.inputs import flat_elements

EXACT = [
    layout.NUMEL,
    layout.MAX_ABS,
    layout.ZEROS,
    layout.NANS,
    layout.INFS,
    *range(layout.HIST, layout.ROW_WIDTH),
]
SUMS = [layout.SUM, layout.SUMSQ]
SENTINEL = -7.25


@pytest.fixture(autouse=True)
def interpreted(kernel_device):
    if kernel_device != "cpu":
        pytest.skip("the kernels are compiled for CUDA in this session; this module tests them interpreted on CPU")


def mixed_tensors() -> list[torch.Tensor]:
    """Tiny tensors of every dtype, with zeros, NaN, Inf, an empty one and a transposed one."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(300, generator=g)
    a[[3, 50]] = 0.0
    a[7] = float("nan")
    b = (torch.randn(40, generator=g) * 1e-3).to(torch.float16)
    b[0] = float("-inf")
    c = (torch.randn(6, 9, generator=g) * 100).to(torch.bfloat16).t()
    d = torch.randn(70, generator=g, dtype=torch.float64) * 10 ** torch.randn(70, generator=g, dtype=torch.float64)
    d[1] = -0.0
    e = torch.empty(0, dtype=torch.float32)
    f = torch.randn(17, generator=g).to(torch.float16)
    return [a, b, c, d, e, f]


def numpy_rows(tensors) -> np.ndarray:
    return gradscope.grad_stats(tensors, backend="numpy").to_rows()


def assert_rows_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(actual[:, EXACT], expected[:, EXACT])
    np.testing.assert_allclose(actual[:, SUMS], expected[:, SUMS], rtol=1e-6, atol=0)


def test_triton_rows_equal_the_numpy_backend_on_mixed_dtypes():
    tensors = mixed_tensors()
    rows = triton_backend.triton_rows([flat_elements(t) for t in tensors])
    assert rows.shape == (len(tensors), layout.ROW_WIDTH)
    assert rows.dtype == np.float64
    expected = numpy_rows(tensors)
    assert_rows_equal(rows, expected)
    # The inputs really hold what the comparison is meant to cover.
    np.testing.assert_array_equal(rows[:, layout.NUMEL], [300, 40, 54, 70, 0, 17])
    np.testing.assert_array_equal(rows[:, layout.NANS], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows[:, layout.INFS], [0, 1, 0, 0, 0, 0])
    assert rows[0, layout.ZEROS] == 2 and rows[3, layout.ZEROS] == 1
    np.testing.assert_array_equal(rows[4], np.zeros(layout.ROW_WIDTH))


def test_triton_rows_of_nothing_is_an_empty_table():
    rows = triton_backend.triton_rows([])
    assert rows.shape == (0, layout.ROW_WIDTH)


class LaunchSpy:
    """Wraps ``kernels().grad_stats_launch``: records each launch, then calls through."""

    def __init__(self, monkeypatch):
        self.calls = []
        module = triton_backend.kernels()
        self._real = module.grad_stats_launch
        monkeypatch.setattr(module, "grad_stats_launch", self)

    def __call__(self, values, out, out_rows, **kwargs):
        self.calls.append(([v.dtype for v in values], list(out_rows), kwargs.get("inv_scale")))
        return self._real(values, out, out_rows, **kwargs)


def test_launch_rows_writes_only_the_requested_rows_one_launch_per_dtype(monkeypatch):
    spy = LaunchSpy(monkeypatch)
    g = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(100, generator=g),
        torch.randn(30, generator=g).to(torch.float16),
        torch.randn(64, generator=g) * 4,
        torch.randn(5, generator=g).to(torch.float16),
        torch.randn(9, generator=g).to(torch.bfloat16),
    ]
    out = torch.full((8, layout.ROW_WIDTH), SENTINEL, dtype=torch.float64)
    out_rows = [6, 1, 2, 4, 0]
    triton_backend.launch_rows([flat_elements(t) for t in tensors], out, out_rows)

    assert spy.calls == [
        ([torch.float32, torch.float32], [6, 2], None),
        ([torch.float16, torch.float16], [1, 4], None),
        ([torch.bfloat16], [0], None),
    ]
    written = out.numpy()
    untouched = [3, 5, 7]
    assert (written[untouched] == SENTINEL).all()
    assert_rows_equal(written[out_rows], numpy_rows(tensors))


def test_triton_rows_makes_one_launch_per_dtype(monkeypatch):
    spy = LaunchSpy(monkeypatch)
    tensors = [torch.ones(3), torch.ones(4, dtype=torch.float64), torch.ones(5), torch.ones(6, dtype=torch.float64)]
    rows = triton_backend.triton_rows([flat_elements(t) for t in tensors])
    assert [(dtypes, out_rows) for dtypes, out_rows, _ in spy.calls] == [
        ([torch.float32, torch.float32], [0, 2]),
        ([torch.float64, torch.float64], [1, 3]),
    ]
    np.testing.assert_array_equal(rows[:, layout.NUMEL], [3, 4, 5, 6])
    np.testing.assert_array_equal(rows[:, layout.SUM], [3, 4, 5, 6])


def unscaled_in_float32(tensor: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """``tensor * inv_scale`` with a float32 product (float64 tensors stay float64)."""
    if tensor.dtype == torch.float64:
        return tensor * inv_scale.double()
    return tensor.float() * inv_scale


@pytest.mark.parametrize("inv", [2.0**-10, 1 / 3, 1e-30], ids=["pow2", "third", "tiny"])
def test_inv_scale_gives_the_statistics_of_the_unscaled_gradient(inv):
    tensors = mixed_tensors()
    inv_scale = torch.tensor([inv], dtype=torch.float32)
    rows = triton_backend.triton_rows([flat_elements(t) for t in tensors], inv_scale=inv_scale)
    expected = numpy_rows([unscaled_in_float32(t, inv_scale) for t in tensors])
    assert_rows_equal(rows, expected)
    # Really unscaled: the largest magnitude moved by the factor (up to float32 rounding).
    plain = numpy_rows(tensors)
    finite = plain[:, layout.MAX_ABS] > 0
    assert not np.allclose(rows[finite, layout.MAX_ABS], plain[finite, layout.MAX_ABS])
    if inv == 2.0**-10:  # exact for a power of two: max_abs scales exactly
        np.testing.assert_array_equal(rows[:, layout.MAX_ABS], plain[:, layout.MAX_ABS] * inv)


def test_launch_rows_with_inv_scale_passes_it_to_every_launch(monkeypatch):
    spy = LaunchSpy(monkeypatch)
    inv_scale = torch.tensor([0.5], dtype=torch.float32)
    tensors = [torch.full((4,), 6.0), torch.full((2,), 6.0, dtype=torch.float16)]
    out = torch.full((2, layout.ROW_WIDTH), SENTINEL, dtype=torch.float64)
    triton_backend.launch_rows([flat_elements(t) for t in tensors], out, [1, 0], inv_scale=inv_scale)
    assert [scale is inv_scale for _, _, scale in spy.calls] == [True, True]
    np.testing.assert_array_equal(out[:, layout.MAX_ABS].numpy(), [3.0, 3.0])
    np.testing.assert_array_equal(out[:, layout.SUM].numpy(), [6.0, 12.0])


def test_serves_cpu_in_the_interpreter_and_never_meta():
    assert triton_backend.triton_importable() is True
    assert triton_backend.kernels().is_interpreted() is True
    assert triton_backend.serves(torch.device("cpu")) is True
    assert triton_backend.serves(torch.device("meta")) is False
    # Interpreted kernels read CPU tensors only, CUDA ones never.
    assert triton_backend.serves(torch.device("cuda", 0)) is False


def test_serves_nothing_without_triton(monkeypatch):
    monkeypatch.setattr(triton_backend, "triton_importable", lambda: False)
    assert triton_backend.serves(torch.device("cpu")) is False
