"""The statistic row: one definition of every gradient statistic, shared by all backends.

Every backend (Triton kernels, NumPy fallback) produces, for each tensor, one row of
``ROW_WIDTH`` float64 values laid out as below. Counts are stored as float64 too (exact up
to 2**53 elements), so a whole set of rows moves between device and host in one copy.

=======  ==========  =================================================================
column   name        meaning
=======  ==========  =================================================================
0        numel       number of elements of the tensor (finite or not)
1        sum         sum of the finite elements
2        sumsq       sum of squares of the finite elements
3        max_abs     largest ``|g|`` over the finite elements (0 when there are none)
4        zeros       number of elements equal to +0.0 or -0.0
5        nans        number of NaN elements
6        infs        number of +Inf or -Inf elements
7..70    hist        ``NUM_BINS`` counts of the finite, non-zero ``|g|`` by binade
=======  ==========  =================================================================

Histogram bins are binades (powers of two): bin ``i`` counts ``|g|`` in
``[2**(i - 48), 2**(i - 47))``; bin 0 also takes every smaller non-zero value (subnormals
included) and bin 63 every larger finite value. The bins therefore span about 3.6e-15 to
65536. Backends find a value's bin from the exponent bits of its IEEE-754 encoding (an
integer shift and a clamp), never by calling ``log``: for float32,
``bin = clamp(biased_exponent - 79, 0, 63)``; float16 and bfloat16 are first widened to
float32 (exactly), float64 uses its own 11-bit exponent.

How each column combines across tensors (parameters into a layer, shards into a tensor,
ranks into the world) is declared once in ``COMBINE``: counts and sums add, ``max_abs``
takes the maximum, histograms add bin by bin.
"""

from __future__ import annotations

import numpy as np

NUM_BINS = 64
"""Number of histogram bins."""

HIST_MIN_EXPONENT = -48
"""Bin 0's lower edge is ``2**HIST_MIN_EXPONENT``; bin ``i`` starts at ``2**(i + HIST_MIN_EXPONENT)``."""

HIST_EDGES = np.ldexp(1.0, np.arange(HIST_MIN_EXPONENT, HIST_MIN_EXPONENT + NUM_BINS + 1))
"""The 65 bin edges, ``2**-48 ... 2**16`` (float64, shape ``(65,)``).

Bin ``i`` counts finite non-zero ``|g|`` with ``HIST_EDGES[i] <= |g| < HIST_EDGES[i + 1]``,
except that bin 0 also counts every non-zero ``|g| < HIST_EDGES[0]`` (about 3.6e-15) and
bin 63 every finite ``|g| >= HIST_EDGES[63]`` (32768), including values beyond 65536.
Zeros and non-finite values are never in the histogram; they have their own counts.
"""

SCALAR_FIELDS = ("numel", "sum", "sumsq", "max_abs", "zeros", "nans", "infs")
"""Names of the scalar columns, in column order."""

NUMEL, SUM, SUMSQ, MAX_ABS, ZEROS, NANS, INFS = range(len(SCALAR_FIELDS))
HIST = len(SCALAR_FIELDS)
"""First histogram column; the histogram occupies ``HIST : HIST + NUM_BINS``."""

ROW_WIDTH = HIST + NUM_BINS
"""Columns per statistics row (71)."""

COUNT_FIELDS = ("numel", "zeros", "nans", "infs")
"""Scalar fields that hold counts (exact integers)."""

COMBINE = {
    "numel": "sum",
    "sum": "sum",
    "sumsq": "sum",
    "max_abs": "max",
    "zeros": "sum",
    "nans": "sum",
    "infs": "sum",
    "hist": "sum",
}
"""How each field combines across tensors: ``"sum"`` adds, ``"max"`` takes the maximum."""

MAX_COLUMNS = np.array([MAX_ABS])
"""Columns combined by maximum; every other column is combined by addition."""


def combine_rows(rows: np.ndarray, axis: int = 0) -> np.ndarray:
    """Combine statistics rows into one, as if their tensors were one tensor.

    Args:
        rows: float64 array whose last axis has length ``ROW_WIDTH``.
        axis: the axis along which rows are combined (not the last one).

    Returns:
        float64 array with ``axis`` removed: sums and counts added, ``max_abs`` maximised.
        Combining zero rows gives the row of an empty tensor (all zeros).
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.shape[-1] != ROW_WIDTH:
        raise ValueError(f"statistics rows must have {ROW_WIDTH} columns, got shape {rows.shape}")
    if axis % rows.ndim == rows.ndim - 1:
        raise ValueError("cannot combine along the column axis")
    with np.errstate(over="ignore"):  # sums beyond float64's range are inf, as they should be
        combined = rows.sum(axis=axis)
    if rows.shape[axis] > 0:
        combined[..., MAX_COLUMNS] = rows[..., MAX_COLUMNS].max(axis=axis)
    return combined
