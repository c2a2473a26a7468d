"""The statistics row: one definition of every gradient statistic, shared by all backends.

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

**Light rows.** The histogram is the costly part of a row (on a GPU, most of the kernel's
instructions), so a row may be computed without it: *light statistics*, every column but the
histogram, whose columns are then all NaN (:data:`NO_HISTOGRAM`; :func:`histogram_known`
tells). A light pass still computes a tensor's histogram when the tensor *triggers*
(:func:`triggers_histogram`): it holds NaN/Inf, a non-zero ``|g|`` below :data:`TINY_BELOW`
or a finite ``|g|`` from :data:`HUGE_FROM` up (after unscaling), the values outside the
range where plain float32 sums are accurate and exactly what a histogram explains. Every
backend applies the same rule, so a light row is the same on each.

Three rules are declared here once and read by every piece of code that needs them:

* **how rows combine** (:data:`COMBINE`): counts, sums and histogram bins add, ``max_abs``
  takes the maximum. Parameters into a layer (the monitor), chunks into a tensor (NumPy
  backend), shards into a whole gradient and ranks into the world (distributed) all combine
  with :func:`combine_rows`, :func:`combine_segments` or the column sets
  :data:`SUM_COLUMNS`/:data:`MAX_COLUMNS`; the Triton kernel's own final reduction is
  checked against this declaration by its tests.
  A row combined from parts has a histogram only if every part has one: an unknown
  (NaN) histogram stays unknown through any combine, never a partial count.
* **derived values** (:func:`derive`): norm, rms, mean, zero fraction, finite and
  non-finite counts, computed from the columns by one formula each.
* **when a light pass computes a histogram anyway** (:func:`triggers_histogram`).
"""

from __future__ import annotations

from collections.abc import Mapping

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

NO_HISTOGRAM = np.nan
"""What every histogram column of a row holds when its histogram was not computed."""

TINY_BELOW = 2.0**-63
"""Non-zero magnitudes below this are *tiny*: their float32 squares underflow."""

HUGE_FROM = 2.0**56
"""Finite magnitudes from this up are *huge*: float32 sums of their squares may overflow."""

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
"""How each field combines across tensors, as if they were one tensor: ``"sum"`` adds,
``"max"`` takes the maximum. The scalar fields are listed in column order; ``"hist"`` is
every histogram column."""

SCALAR_FIELDS = tuple(name for name in COMBINE if name != "hist")
"""Names of the scalar columns, in column order."""

NUMEL, SUM, SUMSQ, MAX_ABS, ZEROS, NANS, INFS = range(len(SCALAR_FIELDS))
HIST = len(SCALAR_FIELDS)
"""First histogram column; the histogram occupies ``HIST : HIST + NUM_BINS``."""

ROW_WIDTH = HIST + NUM_BINS
"""Columns per statistics row (71)."""

COUNT_FIELDS = ("numel", "zeros", "nans", "infs")
"""Scalar fields that hold counts (exact integers)."""

_RULE_OF_COLUMN = np.array([COMBINE[name] for name in SCALAR_FIELDS] + [COMBINE["hist"]] * NUM_BINS)

MAX_COLUMNS = np.flatnonzero(_RULE_OF_COLUMN == "max")
"""Columns combined by maximum (from :data:`COMBINE`)."""

SUM_COLUMNS = np.flatnonzero(_RULE_OF_COLUMN == "sum")
"""Columns combined by addition (from :data:`COMBINE`): every column not in ``MAX_COLUMNS``."""


def _check_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    if rows.shape[-1] != ROW_WIDTH:
        raise ValueError(f"statistics rows must have {ROW_WIDTH} columns, got shape {rows.shape}")
    return rows


def combine_rows(rows: np.ndarray, axis: int = 0) -> np.ndarray:
    """Combine statistics rows into one, as if their tensors were one tensor (:data:`COMBINE`).

    Args:
        rows: float64 array whose last axis has length ``ROW_WIDTH``.
        axis: the axis along which rows are combined (not the last one).

    Returns:
        float64 array with ``axis`` removed. Combining zero rows gives the row of an empty
        tensor (all zeros).
    """
    rows = _check_rows(rows)
    if axis % rows.ndim == rows.ndim - 1:
        raise ValueError("cannot combine along the column axis")
    # Sums beyond float64's range are inf (or NaN where +inf meets -inf), as they should be.
    with np.errstate(over="ignore", invalid="ignore"):
        combined = rows.sum(axis=axis)
    if rows.shape[axis] > 0:
        combined[..., MAX_COLUMNS] = rows[..., MAX_COLUMNS].max(axis=axis)
    return combined


def combine_segments(rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Combine consecutive runs of rows (:data:`COMBINE`), one result per run.

    Args:
        rows: float64 ``(N, ROW_WIDTH)``, the rows of each run next to each other.
        starts: int ``(K,)``, strictly increasing indices where the runs begin (the first is
            0); run ``k`` is ``rows[starts[k]:starts[k + 1]]``. Every run holds one row or more.

    Returns:
        float64 ``(K, ROW_WIDTH)``.
    """
    rows = _check_rows(rows)
    with np.errstate(over="ignore", invalid="ignore"):
        combined = np.add.reduceat(rows, starts, axis=0)
    combined[:, MAX_COLUMNS] = np.maximum.reduceat(rows[:, MAX_COLUMNS], starts, axis=0)
    return combined


def histogram_known(rows: np.ndarray) -> np.ndarray:
    """bool ``(...)``: where a row's histogram was computed (its columns hold counts, not NaN).

    Args:
        rows: float64 array whose last axis has length ``ROW_WIDTH``.
    """
    return ~np.isnan(_check_rows(rows)[..., HIST])


def triggers_histogram(nonfinite, min_nonzero_abs, max_abs) -> np.ndarray:
    """bool: whether a light pass must compute a tensor's histogram anyway (module docstring).

    Args:
        nonfinite: NaN and Inf elements of the tensor.
        min_nonzero_abs: its smallest non-zero finite ``|g|`` (``inf`` when there is none).
        max_abs: its largest finite ``|g|``.

    All after unscaling, arrays of one shape (or scalars).
    """
    return (np.asarray(nonfinite) > 0) | (np.asarray(min_nonzero_abs) < TINY_BELOW) | (np.asarray(max_abs) >= HUGE_FROM)


# ---- derived values ---------------------------------------------------------------------

_DERIVATIONS = {
    "finite": (("numel", "nans", "infs"), lambda numel, nans, infs: numel - nans - infs),
    "nonfinite": (("nans", "infs"), lambda nans, infs: nans + infs),
    "norm": (("sumsq",), np.sqrt),
    "rms": (("sumsq", "finite"), lambda sumsq, finite: np.sqrt(sumsq / np.maximum(finite, 1))),
    "mean": (("sum", "finite"), lambda total, finite: total / np.maximum(finite, 1)),
    "zero_frac": (("zeros", "numel"), lambda zeros, numel: zeros / np.maximum(numel, 1)),
    "rms_nonzero": (
        ("sumsq", "finite", "zeros"),
        lambda sumsq, finite, zeros: np.where(
            finite - zeros > 0, np.sqrt(sumsq / np.maximum(finite - zeros, 1)), np.nan
        ),
    ),
}

DERIVED_FIELDS = ("norm", "rms", "mean", "zero_frac", "nonfinite", "finite")
"""Values derived from the columns, by :func:`derive`:

* ``norm``: L2 norm of the finite elements, ``sqrt(sumsq)``;
* ``rms``: root mean square of the finite elements, ``sqrt(sumsq / finite)`` (0 when none);
* ``mean``: ``sum / finite`` (0 when none);
* ``zero_frac``: fraction of all elements exactly zero, ``zeros / numel`` (0 when empty);
* ``nonfinite``: ``nans + infs``; ``finite``: ``numel - nans - infs``.

``derive`` also knows ``rms_nonzero``, the rms over the non-zero finite elements (NaN when
there are none): the magnitude of the gradient a layer does receive, however sparse.
"""


def derive(name: str, fields: Mapping[str, np.ndarray]) -> np.ndarray:
    """A derived value (see :data:`DERIVED_FIELDS`) from named columns.

    Args:
        name: ``"norm"``, ``"rms"``, ``"mean"``, ``"zero_frac"``, ``"nonfinite"``,
            ``"finite"`` or ``"rms_nonzero"``.
        fields: arrays of any one shape, by column name (``"numel"``, ``"sumsq"``...); a
            derived value given here (``"finite"``) is used as is. NaN entries (absent
            rows) stay NaN.

    Returns:
        float64 (or, from integer counts, int64) array of the same shape.
    """
    if name in fields:
        return fields[name]
    try:
        inputs, formula = _DERIVATIONS[name]
    except KeyError:
        raise KeyError(f"{name!r} is neither a statistics column given nor a derived value") from None
    with np.errstate(divide="ignore", invalid="ignore"):
        return formula(*(derive(field, fields) for field in inputs))
