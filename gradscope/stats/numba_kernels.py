"""The compiled CPU kernel: every statistic of a run of elements in one fused pass (numba).

The same rows as :mod:`gradscope.stats.numpy_kernels` (see :mod:`gradscope.stats.layout`),
computed the way the Triton kernel computes them on a GPU: each block of 64 Ki elements is
read once from memory into cache and reduced there by tight loops:

* the histogram of the raw IEEE-754 exponent field (256 values for float32, 2048 for
  float64), counted into eight (float32) or four (float64) interleaved tables so that
  neighbouring elements of the same binade do not wait on each other's increment; the
  exponent counts then fold onto the 64 binade bins, the zero/subnormal and NaN/Inf counts;
* the sums, in float64 per element (vectorised: the loop is compiled with reassociation
  allowed, so its summation order is fixed by the compiled code, not by the threads);
* ``max |g|`` as the largest ``bits & 0x7F...F`` (for finite values integer order is
  magnitude order, and a 32-bit integer maximum vectorises where a float one does not).

A block that holds NaN/Inf (its exponent count says so) is summed instead by one loop that
skips them and counts NaNs and Infs; zeros are counted only when the exponent count says a block may
hold some. Counts, ``max_abs`` and the histogram are exact, as in every backend; the sums
add float64 values, so their relative error is below ``n * 2**-53``.

The compiled loops live in :mod:`gradscope.stats.numba_loops`, with those of the light
kernel (:mod:`gradscope.stats.numba_light_kernels`, rows without a histogram), which shares
the blocks and the sums; this module prepares their arguments.

Importing this module needs numba (the ``gradscope[numba]`` extra); functions compile on
first call (a few seconds, then cached on disk).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gradscope.stats import layout, numba_loops
from gradscope.stats.numba_loops import BLOCK as BLOCK
from gradscope.stats.numba_loops import SMALL as SMALL


def _scratch(dtype: np.dtype, scaled: bool) -> tuple:
    """The arrays ``numba_loops.runs`` reuses for one call (typed by ``dtype``, so it compiles per format)."""
    bits, exponents, ways, _ = numba_loops.FORMATS[dtype]
    buffer = np.empty(BLOCK if scaled else 0, dtype=dtype)
    top = np.zeros(1, dtype=bits)
    return (
        np.empty(0, dtype=dtype),
        np.empty(0, dtype=bits),
        buffer,
        buffer.view(bits),
        np.zeros(ways * exponents, dtype=np.uint32),
        np.zeros(exponents, dtype=np.int64),
        top,
        top.view(dtype),
    )


def _rows_at(dtype: np.dtype, addresses: np.ndarray, sizes: np.ndarray, inv_scale: float | None) -> np.ndarray:
    dtype = np.dtype(dtype)
    out = np.zeros((sizes.size, layout.ROW_WIDTH))
    scale = dtype.type(np.float32(1.0 if inv_scale is None else inv_scale))  # a GradScaler holds it in float32
    scaled = inv_scale is not None
    numba_loops.runs(addresses, sizes, out, numba_loops.FORMATS[dtype][3], _scratch(dtype, scaled), scale, scaled)
    return out


def rows(values: np.ndarray, starts: np.ndarray, inv_scale: float | None = None) -> np.ndarray:
    """Statistics rows (float64 ``(K, ROW_WIDTH)``) of the runs ``values[starts[k]:starts[k + 1]]``.

    Args:
        values: contiguous 1-D float32 or float64 elements (not modified).
        starts: int64 ``(K + 1,)``, non-decreasing run boundaries from 0 to ``values.size``.
        inv_scale: if given, statistics of ``values * inv_scale``, with inv_scale rounded to
            float32 and the product in the values' precision, as ``GradScaler.unscale_``.
    """
    if not values.flags.c_contiguous or values.dtype not in (np.float32, np.float64):
        raise ValueError(f"numba_kernels.rows needs contiguous float32/float64 values, got {values.dtype}")
    addresses = values.ctypes.data + starts[:-1] * values.itemsize
    return _rows_at(values.dtype, addresses.astype(np.int64), np.diff(starts).astype(np.int64), inv_scale)


def tensor_rows(tensors: Sequence[torch.Tensor], sizes: np.ndarray, inv_scale: float | None = None) -> np.ndarray:
    """Statistics rows of whole tensors, read in place (no copy, no flattening).

    Args:
        tensors: contiguous CPU tensors, all float32 or all float64 (the caller checks; they
            must stay alive during the call, as the caller's list keeps them).
        sizes: int64, each tensor's number of elements.
        inv_scale: as for :func:`rows`.
    """
    addresses = np.fromiter((t.data_ptr() for t in tensors), dtype=np.int64, count=len(tensors))
    return _rows_at(np.float32 if tensors[0].dtype == torch.float32 else np.float64, addresses, sizes, inv_scale)
