"""The compiled CPU kernel for *light* rows: every column but the histogram (numba).

A light row (see :mod:`gradscope.stats.layout`) holds the scalar columns of the full row,
bit for bit, and NaN histogram columns. It reports beside each row what the histogram
trigger (:func:`gradscope.stats.layout.triggers_histogram`) needs that the row lacks: the
smallest non-zero finite ``|g|``. The caller (:mod:`gradscope.stats.host_backend`) decides
per tensor and computes the histograms that trigger with the full kernel.

Each block of :data:`~gradscope.stats.numba_loops.BLOCK` elements (the full kernel's blocks)
is read from memory once and reduced in cache by two loops:

* one integer loop over the bits (no histogram): the largest magnitude ``bits & 0x7F...F``,
  the smallest ``(magnitude - 1) & 0x7F...F`` (a zero wraps to the largest value, so this
  is the smallest non-zero magnitude, less one) and the number of zeros. For float32 the
  bits are uint32, whose minimum and maximum vectorise; for float64 they are read as
  int64 (magnitudes fit in 63 bits), whose signed minimum and maximum vectorise where the
  unsigned 64-bit ones do not;
* the sums, by the full kernel's own loop; a block whose largest magnitude reaches Inf's
  bits holds NaN/Inf and is summed instead by the full kernel's careful loop, which also
  counts NaNs and Infs and gives the largest finite magnitude.

The same blocks, the same loops and the same order of adding block results as the full
kernel make its sums equal the full kernel's bit for bit.

The compiled loops, this kernel's and those it shares with the full kernel, live in
:mod:`gradscope.stats.numba_loops`; this module prepares their arguments. Importing it
needs numba (the ``gradscope[numba]`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gradscope.stats import layout, numba_loops
from gradscope.stats.numba_loops import BLOCK


def _scratch(dtype: np.dtype, scaled: bool) -> tuple:
    """The arrays ``numba_loops.light_runs`` reuses for one call (typed by ``dtype``: compiled per format)."""
    bits = numba_loops.LIGHT_FORMATS[dtype][0]
    buffer = np.empty(BLOCK if scaled else 0, dtype=dtype)
    one = np.zeros(1, dtype=bits)
    return np.empty(0, dtype=dtype), np.empty(0, dtype=bits), buffer, buffer.view(bits), one, one.view(dtype)


def _light_rows_at(
    dtype: np.dtype, addresses: np.ndarray, sizes: np.ndarray, inv_scale: float | None
) -> tuple[np.ndarray, np.ndarray]:
    dtype = np.dtype(dtype)
    out = np.zeros((sizes.size, layout.ROW_WIDTH))
    lowest = np.empty(sizes.size)
    scale = dtype.type(np.float32(1.0 if inv_scale is None else inv_scale))  # a GradScaler holds it in float32
    scaled = inv_scale is not None
    fmt = numba_loops.LIGHT_FORMATS[dtype][1]
    numba_loops.light_runs(addresses, sizes, out, lowest, fmt, _scratch(dtype, scaled), scale, scaled)
    out[:, layout.HIST :] = layout.NO_HISTOGRAM
    return out, lowest


def light_rows(values: np.ndarray, starts: np.ndarray, inv_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Light rows of the runs ``values[starts[k]:starts[k + 1]]``, and what the trigger needs.

    Args:
        values: contiguous 1-D float32 or float64 elements (not modified).
        starts: int64 ``(K + 1,)``, non-decreasing run boundaries from 0 to ``values.size``.
        inv_scale: if given, statistics of ``values * inv_scale``, with inv_scale rounded to
            float32 and the product in the values' precision, as ``GradScaler.unscale_``.

    Returns:
        ``(rows, lowest)``: float64 ``(K, ROW_WIDTH)`` light rows (histogram columns
        :data:`~gradscope.stats.layout.NO_HISTOGRAM`), and float64 ``(K,)``, each run's
        smallest non-zero finite ``|x|`` (``inf`` when there is none).
    """
    if not values.flags.c_contiguous or values.dtype not in (np.float32, np.float64):
        raise ValueError(f"numba_light_kernels.light_rows needs contiguous float32/float64 values, got {values.dtype}")
    addresses = values.ctypes.data + starts[:-1] * values.itemsize
    return _light_rows_at(values.dtype, addresses.astype(np.int64), np.diff(starts).astype(np.int64), inv_scale)


def light_tensor_rows(
    tensors: Sequence[torch.Tensor], sizes: np.ndarray, inv_scale: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`light_rows` of whole tensors, read in place (no copy, no flattening).

    Args:
        tensors: contiguous CPU tensors, all float32 or all float64 (the caller checks; they
            must stay alive during the call, as the caller's list keeps them).
        sizes: int64, each tensor's number of elements.
        inv_scale: as for :func:`light_rows`.
    """
    addresses = np.fromiter((t.data_ptr() for t in tensors), dtype=np.int64, count=len(tensors))
    dtype = np.float32 if tensors[0].dtype == torch.float32 else np.float64
    return _light_rows_at(dtype, addresses, sizes, inv_scale)
