"""Hypothesis strategies for gradient-like tensors, special values and awkward layouts."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def _bits(value: float, dtype: torch.dtype) -> int:
    return int(torch.tensor(value, dtype=dtype).view(_INT_VIEW[dtype]))


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """NaN, ±Inf, ±0, smallest/largest subnormal, smallest normal, largest finite, every
    histogram bin edge 2**k (k = -50..18) and the float just below each edge, in ``dtype``."""
    info = torch.finfo(dtype)
    patterns = [1, (1 << _MANTISSA_BITS[dtype]) - 1]  # smallest and largest subnormal
    values = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, info.tiny, -info.tiny, info.max, -info.max]
    for k in range(-50, 19):
        edge = 2.0**k
        if info.tiny <= edge <= info.max:
            values += [edge, -edge]
            patterns.append(_bits(edge, dtype) - 1)  # the largest value below the edge
    from_values = torch.tensor(values, dtype=torch.float64).to(dtype)
    from_bits = torch.tensor(patterns, dtype=torch.int64).to(_INT_VIEW[dtype]).view(dtype)
    return torch.cat([from_values, from_bits, -from_bits])


@st.composite
def flat_values(draw, dtype: torch.dtype, max_numel: int) -> torch.Tensor:
    """A 1-D tensor of ``dtype``: scaled normal noise with optional zeros and special values."""
    n = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 7, 63, 64, 65, 255, 256, 257]), st.integers(0, max_numel)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 2.0 ** draw(st.integers(-60, 24))
    x = torch.from_numpy(rng.standard_normal(n) * scale).to(dtype)
    zero_frac = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    x[torch.from_numpy(rng.random(n) < zero_frac)] = 0
    special_frac = draw(st.sampled_from([0.0, 0.0, 0.01, 0.3, 1.0]))
    chosen = torch.from_numpy(rng.random(n) < special_frac)
    specials = special_values(dtype)
    x[chosen] = specials[torch.from_numpy(rng.integers(0, specials.numel(), int(chosen.sum())))]
    return x


@st.composite
def gradient_tensors(draw, dtypes=DTYPES, max_numel: int = 2000) -> torch.Tensor:
    """A tensor as gradients come: any float dtype and a contiguous, transposed, strided,
    expanded, offset or channels-last layout."""
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["flat", "matrix", "transposed", "stepped", "expanded", "offset", "channels_last"]))
    if layout == "flat":
        return draw(flat_values(dtype, max_numel))
    if layout == "offset":  # storage offset of one element: an unaligned start
        return draw(flat_values(dtype, max_numel))[1:]
    rows = draw(st.integers(1, 40))
    cols = draw(st.integers(1, 40))
    values = draw(flat_values(dtype, 4 * rows * cols))

    def filled(numel: int) -> torch.Tensor:  # the drawn values, zero-padded to numel
        return torch.cat([values, torch.zeros(numel, dtype=dtype)])[:numel]

    if layout == "channels_last":
        shape = (2, draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
        return filled(int(np.prod(shape))).reshape(shape).contiguous(memory_format=torch.channels_last)
    data = filled(4 * rows * cols)
    matrix = data[: rows * cols].reshape(rows, cols)
    if layout == "matrix":
        return matrix
    if layout == "transposed":
        return matrix.t()
    if layout == "stepped":
        return data.reshape(2 * rows, 2 * cols)[::2, 1::2]
    return matrix[:1].expand(draw(st.integers(1, 5)), cols)  # expanded: overlapping elements


@st.composite
def many_small_and_a_few_large(draw, dtypes=DTYPES, large_numel: int = 3000) -> list[torch.Tensor]:
    """Tens of tiny tensors (biases, norms) around one or two large ones, dtypes mixed."""
    tensors = draw(st.lists(gradient_tensors(dtypes, max_numel=40), min_size=10, max_size=60))
    for _ in range(draw(st.integers(1, 2))):
        tensors.insert(draw(st.integers(0, len(tensors))), draw(gradient_tensors(dtypes, max_numel=large_numel)))
    return tensors


@st.composite
def kernel_runs(draw, boundary_sizes: list[int]) -> tuple[torch.Tensor, np.ndarray]:
    """float32/float64 values laid end to end in runs, and the runs' int64 boundaries
    ``(K + 1,)``: run sizes sit on a kernel's internal ``boundary_sizes`` or are anything
    up to 3000, with zeros, subnormals, NaN/Inf and every bin edge sprinkled in."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    sizes = draw(st.lists(st.one_of(st.sampled_from(boundary_sizes), st.integers(0, 3000)), min_size=1, max_size=5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = sum(sizes)
    values = torch.from_numpy(rng.standard_normal(n) * 2.0 ** draw(st.integers(-60, 20))).to(dtype)
    specials = special_values(dtype)
    for fraction in (draw(st.sampled_from([0.0, 1e-4, 0.01, 0.5])), draw(st.sampled_from([0.0, 0.2]))):
        chosen = torch.from_numpy(rng.random(n) < fraction)
        values[chosen] = specials[torch.from_numpy(rng.integers(0, specials.numel(), int(chosen.sum())))]
    starts = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    return values, starts
