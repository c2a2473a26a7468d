"""The NumPy CPU kernel: every statistic of runs of elements from a handful of large NumPy calls.

Always available (the compiled kernel, :mod:`gradscope.stats.numba_kernels`, needs numba).
:mod:`gradscope.stats.host_backend` hands it runs of float32/float64 elements: one slice of
a large tensor, or many small tensors laid end to end. Each NumPy call runs without the GIL.

* histogram: the exponent byte is cut out of each value's bits with one shift (no ``log``),
  clamped into a bin, and bins are counted two at a time (a pair of bin bytes read as one
  ``uint16`` key), halving the scalar loop inside ``np.bincount`` that dominates its cost;
* zeros and non-finite values are derived from that histogram and from ``max``/``min`` and
  only counted separately when the histogram says they may be present;
* sums: float32 dot products of 256-element rows (with themselves, and with ones),
  combined in float64 (relative error below 1e-6); a run whose float32 sums overflow, or
  whose sum of squares is small enough for float32 underflow to matter, is summed again in
  float64. Packed small tensors are summed in float64 by segments.

*Light* rows (every column but the histogram, whose columns are NaN: see
:mod:`gradscope.stats.layout`) skip the bins. Each value's bits shifted left by one (the sign
shifted out) are a *key*, ``2 * |x|`` as an unsigned integer: zeros are 0, NaN/Inf are
from Inf's key up, and integer order is magnitude order. NumPy's integer ``max``/``min``
reductions (vectorised) then give, in a few passes: whether NaN/Inf are present (only then
are they counted, as in the full kernel), ``max_abs``, whether zeros are present (only
then counted) and the smallest non-zero ``|x|`` (the minimum of the keys less two, which
wraps zeros to the largest key) that the histogram trigger needs. The sums are the full
kernel's code on the same values, so a light row's scalar columns equal the full row's.
"""

from __future__ import annotations

import numpy as np

from gradscope.stats import layout

PAIRS_FROM = 1 << 16
"""Runs with at least this many elements count histogram bins in pairs (see ``_bin_counts``)."""

_ROW_DOT = 256  # elements per float32 dot product in the fast sums
_ONES_F32 = np.ones(_ROW_DOT, dtype=np.float32)
_VECDOT = getattr(np, "vecdot", None)  # NumPy >= 2.0; einsum otherwise
_PAIR_KEYS = layout.NUM_BINS * 256  # bin pairs read as little-endian uint16: lo + 256 * hi
_SMALLEST_SAFE_SUMSQ = 2.0**-100  # below, float32 squares may have lost tiny values
_F32_EXPONENT_BIN0 = 127 + layout.HIST_MIN_EXPONENT  # biased float32 exponent of bin 0 (79)
_F64_EXPONENT_BIN0 = 1023 + layout.HIST_MIN_EXPONENT  # biased float64 exponent of bin 0 (975)
_LAST_BIN = layout.NUM_BINS - 1
_KEY_BITS = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}  # a key per element: 2 * |x|
_INF_KEY = {np.dtype(np.float32): 0xFF000000, np.dtype(np.float64): 0xFFE0000000000000}  # Inf's key


# --------------------------------------------------------------------------------------
# Histogram bins
# --------------------------------------------------------------------------------------


def _bins(values: np.ndarray, ws) -> np.ndarray:
    """uint8 histogram bin of every element, from the exponent bits (no log).

    Zeros and subnormals fall in bin 0 and NaN/Inf in bin 63; callers remove them.
    """
    n = values.size
    bins = ws.get("bins", np.uint8, n)
    if values.dtype == np.float32:
        # The shift leaves sign and exponent; the unsafe cast to uint8 keeps the exponent.
        np.right_shift(values.view(np.uint32), 23, out=bins, casting="unsafe")
        np.clip(bins, _F32_EXPONENT_BIN0, _F32_EXPONENT_BIN0 + _LAST_BIN, out=bins)
        np.subtract(bins, _F32_EXPONENT_BIN0, out=bins)
    else:
        exponent = ws.get("exponent", np.uint16, n)
        np.right_shift(values.view(np.uint64), 52, out=exponent, casting="unsafe")
        np.bitwise_and(exponent, 0x7FF, out=exponent)
        np.clip(exponent, _F64_EXPONENT_BIN0, _F64_EXPONENT_BIN0 + _LAST_BIN, out=exponent)
        np.subtract(exponent, _F64_EXPONENT_BIN0, out=exponent)
        np.copyto(bins, exponent, casting="unsafe")
    return bins


def _bin_counts(bins: np.ndarray, ws) -> np.ndarray:
    """int64 ``(NUM_BINS,)`` counts of a uint8 bin array.

    Large arrays are counted two bins per ``bincount`` step: each pair of bytes read as one
    uint16 key ``a + 256 * b`` (either byte order), whose 2-D counts fold back onto bins.
    """
    n = bins.size
    if n < PAIRS_FROM:
        return np.bincount(bins, minlength=layout.NUM_BINS)
    half = n // 2
    keys = ws.get("pair_keys", np.intp, half)
    np.copyto(keys, bins[: 2 * half].view(np.uint16))
    pairs = np.bincount(keys, minlength=_PAIR_KEYS)[:_PAIR_KEYS].reshape(layout.NUM_BINS, 256)
    pairs = pairs[:, : layout.NUM_BINS]
    counts = pairs.sum(axis=0) + pairs.sum(axis=1)
    if n % 2:
        counts[bins[-1]] += 1
    return counts


# --------------------------------------------------------------------------------------
# One run of elements -> one row
# --------------------------------------------------------------------------------------


def _row_dots(rows: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Dot product of each row of ``rows`` with the matching row of ``other`` (broadcast)."""
    if _VECDOT is not None:
        return _VECDOT(rows, other)
    return np.einsum("ij,ij->i", rows, np.broadcast_to(other, rows.shape))


def _sums(values: np.ndarray, ws) -> tuple[float, float]:
    """(sum, sum of squares) of finite values, to ~1e-6 relative or better.

    float32 runs are reduced as 256-element rows (float32 dot products of each row with
    itself and with ones), and the row results added in float64. Runs whose float32 sums
    overflow, or whose squares are small enough for float32 underflow to matter (sum of
    squares below 2**-100), are summed again in float64.
    """
    if values.dtype == np.float32:
        body = values.size - values.size % _ROW_DOT
        rows = values[:body].reshape(-1, _ROW_DOT)
        tail = values[body:].astype(np.float64)
        total = float(np.add.reduce(_row_dots(rows, _ONES_F32), dtype=np.float64)) + float(tail.sum())
        squares = float(np.add.reduce(_row_dots(rows, rows), dtype=np.float64)) + float(np.einsum("i,i->", tail, tail))
        if np.isfinite(total) and np.isfinite(squares) and squares >= _SMALLEST_SAFE_SUMSQ:
            return total, squares
        wide = ws.get("wide", np.float64, values.size)
        np.copyto(wide, values)
        values = wide
    return float(np.add.reduce(values)), float(np.einsum("i,i->", values, values))


def _run_row(values: np.ndarray, ws) -> np.ndarray:
    """The statistics row of one run of float32/float64 elements (see ``layout``)."""
    row = np.zeros(layout.ROW_WIDTH)
    n = values.size
    row[layout.NUMEL] = n
    if n == 0:
        return row
    hist = _bin_counts(_bins(values, ws), ws)
    high, low = values.max(), values.min()
    if not (np.isfinite(high) and np.isfinite(low)):
        nonfinite = ~np.isfinite(values)
        nans = int(np.count_nonzero(np.isnan(values)))
        infs = int(np.count_nonzero(nonfinite)) - nans
        hist[_LAST_BIN] -= nans + infs
        finite = np.where(nonfinite, 0, values)
        high, low = finite.max(), finite.min()
        row[layout.NANS], row[layout.INFS] = nans, infs
        values = finite
        zeros = int(np.count_nonzero(values == 0)) - nans - infs
    elif hist[0]:
        zeros = int(np.count_nonzero(np.equal(values, 0, out=ws.get("is_zero", bool, n))))
    else:
        zeros = 0
    hist[0] -= zeros
    row[layout.SUM], row[layout.SUMSQ] = _sums(values, ws)
    row[layout.MAX_ABS] = abs(max(float(high), -float(low)))  # abs: +0.0, not -0.0, for a run of -0.0
    row[layout.ZEROS] = zeros
    row[layout.HIST :] = hist
    return row


def _packed_rows(values: np.ndarray, sizes: np.ndarray, ws) -> np.ndarray:
    """Rows of several non-empty tensors laid end to end in ``values`` (segmented reductions).

    Zeros and NaN/Inf are looked for only in tensors whose histogram says they may hold
    some (bin 0 takes zeros and subnormals, bin 63 NaN/Inf and huge values)."""
    k = sizes.size
    starts = np.zeros(k, dtype=np.intp)
    np.cumsum(sizes[:-1], out=starts[1:])
    rows = np.zeros((k, layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = sizes
    segment = np.repeat(np.arange(k, dtype=np.intp) * layout.NUM_BINS, sizes)
    segment += _bins(values, ws)
    hist = np.bincount(segment, minlength=k * layout.NUM_BINS).reshape(k, layout.NUM_BINS)
    if hist[:, 0].any():
        zeros = np.add.reduceat((values == 0).view(np.uint8), starts, dtype=np.int64)
        hist[:, 0] -= zeros
        rows[:, layout.ZEROS] = zeros
    hist[:, _LAST_BIN] -= _packed_finite_columns(values, starts, ws, rows, bool(hist[:, _LAST_BIN].any()))
    rows[:, layout.HIST :] = hist
    return rows


def _packed_finite_columns(values: np.ndarray, starts: np.ndarray, ws, rows: np.ndarray, look_for_nonfinite: bool):
    """Fill the sums, ``max_abs`` and the NaN/Inf counts of packed rows (float64 sums by
    segments, the same code for full and light rows); NaN/Inf are looked for only when
    ``look_for_nonfinite``. Returns int64 ``(K,)`` NaN plus Inf elements per row (or 0)."""
    wide = ws.get("wide", np.float64, values.size)
    np.copyto(wide, values)
    finite = values
    nonfinite_per_row = 0
    if look_for_nonfinite:
        nonfinite = ~np.isfinite(wide)
        if nonfinite.any():
            nans = np.add.reduceat(np.isnan(wide).view(np.uint8), starts, dtype=np.int64)
            nonfinite_per_row = np.add.reduceat(nonfinite.view(np.uint8), starts, dtype=np.int64)
            rows[:, layout.NANS], rows[:, layout.INFS] = nans, nonfinite_per_row - nans
            wide[nonfinite] = 0
            finite = wide
    rows[:, layout.SUM] = np.add.reduceat(wide, starts)
    magnitude = ws.get("magnitude", finite.dtype, values.size)
    np.abs(finite, out=magnitude)  # in the values' own precision: exact, and half the bytes for float32
    rows[:, layout.MAX_ABS] = np.maximum.reduceat(magnitude, starts)
    np.square(wide, out=wide)
    rows[:, layout.SUMSQ] = np.add.reduceat(wide, starts)
    return nonfinite_per_row


# --------------------------------------------------------------------------------------
# Light rows: no histogram, and each row's smallest non-zero |x| for the trigger
# --------------------------------------------------------------------------------------


def _keys(values: np.ndarray, ws) -> np.ndarray:
    """uint32/uint64 key of every element: its bits shifted left by one, ``2 * |x|`` in
    integer form (zeros 0, NaN/Inf from ``_INF_KEY`` up; integer order is magnitude order)."""
    bits = values.view(_KEY_BITS[values.dtype])
    keys = ws.get("keys", bits.dtype, values.size)
    np.left_shift(bits, 1, out=keys)
    return keys


def _smallest_nonzero(below: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 ``|x|`` of the smallest non-zero finite values, from their keys less two
    (``below``, unsigned; a row of zeros wrapped to the largest key): ``inf`` where a row has
    no non-zero finite value (its key less two is Inf's less two or more)."""
    none = below >= _INF_KEY[dtype] - 2
    magnitude = ((below + 2) >> 1).view(dtype).astype(np.float64)  # wraps where none: replaced below
    return np.where(none, np.inf, magnitude)


def _light_run_row(values: np.ndarray, ws) -> tuple[np.ndarray, float]:
    """The light row of one run of float32/float64 elements, and its smallest non-zero ``|x|``."""
    row = np.zeros(layout.ROW_WIDTH)
    row[layout.HIST :] = layout.NO_HISTOGRAM
    n = values.size
    row[layout.NUMEL] = n
    if n == 0:
        return row, np.inf
    keys = _keys(values, ws)
    top, bottom = keys.max(), keys.min()
    if bottom == 0:  # zeros: counted, then wrapped past every other key
        row[layout.ZEROS] = n - np.count_nonzero(keys)
        below = np.subtract(keys, 2, out=keys).min()
    else:
        below = bottom - 2  # keys are even: no wrap
    if top >= _INF_KEY[values.dtype]:  # NaN or Inf: counted, then summed as zeros, as the full kernel does
        nonfinite = ~np.isfinite(values)
        nans = int(np.count_nonzero(np.isnan(values)))
        row[layout.NANS], row[layout.INFS] = nans, int(np.count_nonzero(nonfinite)) - nans
        values = np.where(nonfinite, 0, values)
        row[layout.MAX_ABS] = abs(max(float(values.max()), -float(values.min())))  # as _run_row
    else:
        row[layout.MAX_ABS] = float(np.array(top >> 1).view(values.dtype))
    row[layout.SUM], row[layout.SUMSQ] = _sums(values, ws)
    return row, float(_smallest_nonzero(np.array([below]), values.dtype)[0])


def _light_packed_rows(values: np.ndarray, sizes: np.ndarray, ws) -> tuple[np.ndarray, np.ndarray]:
    """Light rows of several non-empty tensors laid end to end in ``values``, and each one's
    smallest non-zero ``|x|`` (segmented reductions)."""
    k = sizes.size
    starts = np.zeros(k, dtype=np.intp)
    np.cumsum(sizes[:-1], out=starts[1:])
    rows = np.zeros((k, layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = sizes
    rows[:, layout.HIST :] = layout.NO_HISTOGRAM
    keys = _keys(values, ws)
    if keys.min() == 0:
        rows[:, layout.ZEROS] = np.add.reduceat((keys == 0).view(np.uint8), starts, dtype=np.int64)
    _packed_finite_columns(values, starts, ws, rows, bool(keys.max() >= _INF_KEY[values.dtype]))
    below = np.minimum.reduceat(np.subtract(keys, 2, out=keys), starts)
    return rows, _smallest_nonzero(below, values.dtype)


def run_row(values: np.ndarray, ws) -> np.ndarray:
    """The statistics row (float64 ``(1, ROW_WIDTH)``) of one run: a slice of a large tensor.

    Args:
        values: contiguous 1-D float32 or float64 elements (not modified).
        ws: scratch buffers (``ws.get(name, dtype, n)``), reused across calls.
    """
    return _run_row(values, ws)[None, :]


def packed_rows(values: np.ndarray, starts: np.ndarray, ws) -> np.ndarray:
    """Statistics rows (float64 ``(K, ROW_WIDTH)``) of whole small tensors laid end to end:
    run ``k`` is ``values[starts[k]:starts[k + 1]]``.

    A tensor's row depends on nothing but the tensor: the same code measures it whichever
    tensors share its pack (so backward and step mode, or one gradient at a time on a
    worker, give identical numbers).
    """
    sizes = np.diff(starts)
    full = sizes > 0
    if full.all():
        return _packed_rows(values, sizes, ws)
    out = np.zeros((sizes.size, layout.ROW_WIDTH))
    if full.any():
        out[full] = _packed_rows(values, sizes[full], ws)
    return out


def light_run_row(values: np.ndarray, ws) -> tuple[np.ndarray, np.ndarray]:
    """The light row of one run (as :func:`run_row`, histogram columns
    :data:`~gradscope.stats.layout.NO_HISTOGRAM`), and what the histogram trigger needs.

    Returns:
        ``(rows, lowest)``: float64 ``(1, ROW_WIDTH)``, and float64 ``(1,)``, the run's
        smallest non-zero finite ``|x|`` (``inf`` when there is none).
    """
    row, lowest = _light_run_row(values, ws)
    return row[None, :], np.array([lowest])


def light_packed_rows(values: np.ndarray, starts: np.ndarray, ws) -> tuple[np.ndarray, np.ndarray]:
    """Light rows of whole small tensors laid end to end (as :func:`packed_rows`), and each
    one's smallest non-zero finite ``|x|`` (float64 ``(K,)``, ``inf`` when there is none).
    A tensor's row and value depend on nothing but the tensor."""
    sizes = np.diff(starts)
    full = sizes > 0
    if full.all():
        return _light_packed_rows(values, sizes, ws)
    out = np.zeros((sizes.size, layout.ROW_WIDTH))
    out[:, layout.HIST :] = layout.NO_HISTOGRAM
    lowest = np.full(sizes.size, np.inf)
    if full.any():
        out[full], lowest[full] = _light_packed_rows(values, sizes[full], ws)
    return out, lowest
