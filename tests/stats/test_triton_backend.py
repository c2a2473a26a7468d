"""The Triton backend's glue (``gradscope.stats.triton_backend``), run on the kernels' device.

``triton_rows`` against the NumPy backend on tiny tensors of mixed dtypes, ``launch_rows``
writing only its rows with one launch per dtype, ``inv_scale`` unscaling, and ``serves``.
Every test runs wherever the kernels read in this session (the ``kernel_device`` fixture):
on CPU tensors in Triton's interpreter on CPU-only machines, on CUDA tensors when the kernels
are compiled on a GPU. Inputs are built on the CPU from seeded generators, then moved to that
device for the Triton backend; the NumPy reference reads CPU copies.
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


def mixed_tensors(device: str = "cpu") -> list[torch.Tensor]:
    """Tiny tensors of every dtype, with zeros, NaN, Inf, an empty one and a transposed one.

    Built on the CPU from a seeded generator, then moved to ``device`` (the transposed one is
    moved before it is transposed, so it is a non-contiguous view on ``device`` too).
    """
    g = torch.Generator().manual_seed(11)
    a = torch.randn(300, generator=g)
    a[[3, 50]] = 0.0
    a[7] = float("nan")
    b = (torch.randn(40, generator=g) * 1e-3).to(torch.float16)
    b[0] = float("-inf")
    c = (torch.randn(6, 9, generator=g) * 100).to(torch.bfloat16).to(device).t()
    d = torch.randn(70, generator=g, dtype=torch.float64) * 10 ** torch.randn(70, generator=g, dtype=torch.float64)
    d[1] = -0.0
    e = torch.empty(0, dtype=torch.float32)
    f = torch.randn(17, generator=g).to(torch.float16)
    tensors = [a.to(device), b.to(device), c, d.to(device), e.to(device), f.to(device)]
    assert not c.is_contiguous()
    assert all(t.device.type == device for t in tensors)
    return tensors


def numpy_rows(tensors) -> np.ndarray:
    """The NumPy backend's rows, read from CPU copies of ``tensors``."""
    return gradscope.grad_stats([t.cpu() for t in tensors], backend="numpy").to_rows()


def assert_rows_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(actual[:, EXACT], expected[:, EXACT])
    np.testing.assert_allclose(actual[:, SUMS], expected[:, SUMS], rtol=1e-6, atol=0)


def test_triton_rows_equal_the_numpy_backend_on_mixed_dtypes(kernel_device):
    tensors = mixed_tensors(kernel_device)
    rows = triton_backend.triton_rows([flat_elements(t) for t in tensors])
    assert rows.shape == (len(tensors), layout.ROW_WIDTH)
    assert rows.dtype == np.float64
    expected = numpy_rows(mixed_tensors())
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
    """Wraps ``kernels().grad_stats_launch``: records each launch, then calls through.

    ``calls`` holds each launch's dtypes, rows and ``inv_scale``; ``devices`` the device types
    of its values, of its output buffer and of its ``inv_scale`` (None without one);
    ``histograms`` its ``histogram`` argument.
    """

    def __init__(self, monkeypatch):
        self.calls = []
        self.devices = []
        self.histograms = []
        module = triton_backend.kernels()
        self._real = module.grad_stats_launch
        monkeypatch.setattr(module, "grad_stats_launch", self)

    def __call__(self, values, out, out_rows, **kwargs):
        inv_scale = kwargs.get("inv_scale")
        self.histograms.append(kwargs.get("histogram"))
        self.calls.append(([v.dtype for v in values], list(out_rows), inv_scale))
        self.devices.append(
            (
                [v.device.type for v in values],
                out.device.type,
                None if inv_scale is None else inv_scale.device.type,
            )
        )
        return self._real(values, out, out_rows, **kwargs)


def test_launch_rows_writes_only_the_requested_rows_one_launch_per_dtype(monkeypatch, kernel_device):
    spy = LaunchSpy(monkeypatch)
    g = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(100, generator=g),
        torch.randn(30, generator=g).to(torch.float16),
        torch.randn(64, generator=g) * 4,
        torch.randn(5, generator=g).to(torch.float16),
        torch.randn(9, generator=g).to(torch.bfloat16),
    ]
    on_device = [t.to(kernel_device) for t in tensors]
    out = torch.full((8, layout.ROW_WIDTH), SENTINEL, dtype=torch.float64, device=kernel_device)
    out_rows = [6, 1, 2, 4, 0]
    triton_backend.launch_rows([flat_elements(t) for t in on_device], out, out_rows)

    assert spy.calls == [
        ([torch.float32, torch.float32], [6, 2], None),
        ([torch.float16, torch.float16], [1, 4], None),
        ([torch.bfloat16], [0], None),
    ]
    assert spy.devices == [
        ([kernel_device, kernel_device], kernel_device, None),
        ([kernel_device, kernel_device], kernel_device, None),
        ([kernel_device], kernel_device, None),
    ]
    written = out.cpu().numpy()
    untouched = [3, 5, 7]
    assert (written[untouched] == SENTINEL).all()
    assert_rows_equal(written[out_rows], numpy_rows(tensors))


def test_triton_rows_makes_one_launch_per_dtype(monkeypatch, kernel_device):
    spy = LaunchSpy(monkeypatch)
    tensors = [torch.ones(3), torch.ones(4, dtype=torch.float64), torch.ones(5), torch.ones(6, dtype=torch.float64)]
    rows = triton_backend.triton_rows([flat_elements(t.to(kernel_device)) for t in tensors])
    assert [(dtypes, out_rows) for dtypes, out_rows, _ in spy.calls] == [
        ([torch.float32, torch.float32], [0, 2]),
        ([torch.float64, torch.float64], [1, 3]),
    ]
    assert spy.devices == [([kernel_device, kernel_device], kernel_device, None)] * 2
    np.testing.assert_array_equal(rows[:, layout.NUMEL], [3, 4, 5, 6])
    np.testing.assert_array_equal(rows[:, layout.SUM], [3, 4, 5, 6])


def unscaled_in_float32(tensor: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """``tensor * inv_scale`` with a float32 product (float64 tensors stay float64)."""
    if tensor.dtype == torch.float64:
        return tensor * inv_scale.double()
    return tensor.float() * inv_scale


@pytest.mark.parametrize("inv", [2.0**-10, 1 / 3, 1e-30], ids=["pow2", "third", "tiny"])
def test_inv_scale_gives_the_statistics_of_the_unscaled_gradient(inv, kernel_device):
    tensors = mixed_tensors(kernel_device)
    inv_scale = torch.tensor([inv], dtype=torch.float32).to(kernel_device)
    rows = triton_backend.triton_rows([flat_elements(t) for t in tensors], inv_scale=inv_scale)
    # The reference: the unscaled tensors, multiplied on the CPU, read by the NumPy backend.
    cpu_tensors = mixed_tensors()
    cpu_inv_scale = torch.tensor([inv], dtype=torch.float32)
    expected = numpy_rows([unscaled_in_float32(t, cpu_inv_scale) for t in cpu_tensors])
    assert_rows_equal(rows, expected)
    # Really unscaled: the largest magnitude moved by the factor (up to float32 rounding).
    plain = numpy_rows(cpu_tensors)
    finite = plain[:, layout.MAX_ABS] > 0
    assert not np.allclose(rows[finite, layout.MAX_ABS], plain[finite, layout.MAX_ABS])
    if inv == 2.0**-10:  # exact for a power of two: max_abs scales exactly
        np.testing.assert_array_equal(rows[:, layout.MAX_ABS], plain[:, layout.MAX_ABS] * inv)


def test_launch_rows_with_inv_scale_passes_it_to_every_launch(monkeypatch, kernel_device):
    spy = LaunchSpy(monkeypatch)
    inv_scale = torch.tensor([0.5], dtype=torch.float32).to(kernel_device)
    tensors = [torch.full((4,), 6.0), torch.full((2,), 6.0, dtype=torch.float16)]
    out = torch.full((2, layout.ROW_WIDTH), SENTINEL, dtype=torch.float64, device=kernel_device)
    triton_backend.launch_rows([flat_elements(t.to(kernel_device)) for t in tensors], out, [1, 0], inv_scale=inv_scale)
    assert [scale is inv_scale for _, _, scale in spy.calls] == [True, True]
    assert spy.devices == [([kernel_device], kernel_device, kernel_device)] * 2
    written = out.cpu().numpy()
    np.testing.assert_array_equal(written[:, layout.MAX_ABS], [3.0, 3.0])
    np.testing.assert_array_equal(written[:, layout.SUM], [6.0, 12.0])


@pytest.mark.parametrize("histogram", [True, False])
def test_histogram_reaches_every_launch_and_light_rows_differ_only_there(monkeypatch, kernel_device, histogram):
    """``triton_rows(..., histogram=False)`` passes it to every launch (each dtype group): the
    rows of tensors that trigger their histogram (a NaN, an Inf) are complete, the others'
    histograms NaN; every other column equals the complete rows'."""
    tensors = mixed_tensors(kernel_device)
    complete = triton_backend.triton_rows([flat_elements(t) for t in tensors])
    spy = LaunchSpy(monkeypatch)
    rows = triton_backend.triton_rows([flat_elements(t) for t in tensors], histogram=histogram)
    assert spy.histograms == [histogram] * 4  # float32, float16, bfloat16, float64
    np.testing.assert_array_equal(rows[:, : layout.HIST], complete[:, : layout.HIST])
    known = layout.histogram_known(rows)
    assert known.tolist() == ([True] * 6 if histogram else [True, True, False, False, False, False])
    np.testing.assert_array_equal(rows[known], complete[known])
    assert np.isnan(rows[~known, layout.HIST :]).all()


def test_serves_the_kernels_device_only_and_never_meta(kernel_device):
    assert triton_backend.triton_importable() is True
    interpreted = kernel_device == "cpu"
    assert triton_backend.kernels().is_interpreted() is interpreted
    assert triton_backend.serves(torch.device("meta")) is False
    # Interpreted kernels read CPU tensors only, CUDA ones never; compiled kernels the reverse.
    assert triton_backend.serves(torch.device("cpu")) is interpreted
    assert triton_backend.serves(torch.device("cuda", 0)) is not interpreted
    assert triton_backend.serves(torch.device(kernel_device)) is True


def test_serves_nothing_without_triton(monkeypatch):
    monkeypatch.setattr(triton_backend, "triton_importable", lambda: False)
    assert triton_backend.serves(torch.device("cpu")) is False
    assert triton_backend.serves(torch.device("cuda", 0)) is False
