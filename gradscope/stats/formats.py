"""Number formats and what a statistics row says about them: underflow, overflow, FP8 readiness.

A row's histogram counts the finite non-zero ``|x|`` by binade (:mod:`gradscope.stats.layout`),
so how many values sit below any power of two is known exactly, without reading the tensor
again. That answers, per tensor:

* **underflow** — how many values are below a format's smallest normal number (float16:
  ``2**-14``), where they lose precision and, one binade further down, flush to zero;
* **FP8 readiness** — how many values would be flushed to zero, or land in the subnormal
  range, if the tensor were cast to an FP8 format (E4M3 or E5M2) with **per-tensor amax
  scaling by a power of two**: the tensor is multiplied by the largest ``2**k`` that keeps
  ``max_abs * 2**k`` within the format's largest finite value, then rounded to nearest. With a
  power-of-two scale every threshold is a binade edge, so the counts are exact (up to values
  exactly at the flush threshold, which round-half-to-even sends to zero and which are
  counted here as kept). A real-valued scale (``fmt.max / amax``) moves the thresholds by
  less than one binade.

The histogram resolves thresholds from ``2**-47`` to ``2**15`` (and any threshold above
``max_abs``); outside that range a count is a lower bound (only values known to be below the
threshold are counted). For FP8 that matters only for extreme tensors: a flush threshold
below ``2**-47`` (``max_abs`` under about 2.7e-5 for E5M2, 1.6e-9 for E4M3, with values
below ``2**-47``) counts those values as subnormal rather than flushed; ``max_abs`` above
about 9.4e8 (E4M3) or 3.1e13 (E5M2) under-counts both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gradscope.stats import layout


@dataclass(frozen=True)
class NumberFormat:
    """A floating-point format's range.

    Attributes:
        name: the torch dtype's name (``"float16"``, ``"float8_e4m3fn"``).
        max: largest finite value.
        min_normal: smallest positive normal value (a power of two).
        min_subnormal: smallest positive subnormal value (a power of two); values below half
            of it round to zero.
    """

    name: str
    max: float
    min_normal: float
    min_subnormal: float
    mantissa_bits: int = 0

    @property
    def top_binade(self) -> float:
        """The largest power of two in range: values at or above it are within one binade of
        ``max`` (float16: 32768), one doubling away from Inf."""
        return math.ldexp(1.0, math.frexp(self.max)[1] - 1)

    @property
    def flush_below(self) -> float:
        """Magnitudes below this round to zero (half the smallest subnormal)."""
        return self.min_subnormal / 2


FLOAT16 = NumberFormat("float16", 65504.0, 2.0**-14, 2.0**-24)
BFLOAT16 = NumberFormat("bfloat16", float(torch.finfo(torch.bfloat16).max), 2.0**-126, 2.0**-133)
FLOAT32 = NumberFormat("float32", float(torch.finfo(torch.float32).max), 2.0**-126, 2.0**-149)
FLOAT64 = NumberFormat("float64", float(torch.finfo(torch.float64).max), 2.0**-1022, 2.0**-1074)
E4M3 = NumberFormat("float8_e4m3fn", 448.0, 2.0**-6, 2.0**-9, mantissa_bits=3)
E5M2 = NumberFormat("float8_e5m2", 57344.0, 2.0**-14, 2.0**-16, mantissa_bits=2)
INT8 = NumberFormat("int8", 127.0, 128.0, 1.0)
"""Symmetric INT8 (levels -127..127) as a format: one uniform grid of step 1, as if every
level were subnormal (its smallest normal, 128, is above its largest value); magnitudes
below 0.5 round to zero. Not in :data:`FORMATS` (no torch dtype is meant)."""

FORMATS = {f.name: f for f in (FLOAT16, BFLOAT16, FLOAT32, FLOAT64, E4M3, E5M2)}
"""Every known format by name."""

LOW_PRECISION = ("float16", "bfloat16")
"""Training formats whose range or precision gradscope judges (``underflow``, ``overflow``)."""

FP8_FORMATS = {"e4m3": E4M3, "e5m2": E5M2}
"""The FP8 formats FP8 readiness is reported for, by short name."""

FP8_FIELDS = tuple(f"fp8_{short}_{what}" for short in FP8_FORMATS for what in ("zero", "subnormal"))
"""Per-row FP8 readiness fields: fractions of the finite non-zero elements that would be
flushed to zero (``_zero``) or become subnormal (``_subnormal``) in that format."""


def format_of(dtype: torch.dtype | str | None) -> NumberFormat | None:
    """The :class:`NumberFormat` of a torch dtype or dtype name (``"torch.float16"`` works),
    or None for anything else."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    return FORMATS.get(name)


def count_below(hist: np.ndarray, max_abs: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """Finite non-zero values with ``|x| < 2**exponent``, from binade histograms.

    Args:
        hist: ``(..., NUM_BINS)`` binade counts.
        max_abs: ``(...)`` largest finite ``|x|`` of each row.
        exponent: ``(...)`` integer exponents (broadcast against ``max_abs``).

    Returns:
        float64 counts (the broadcast shape of the rows, ``max_abs`` and ``exponent``): exact
        when ``-47 <= exponent <= 15`` or ``max_abs < 2**exponent`` (then every value); else a
        lower bound (the values known to be below the threshold).
    """
    hist = np.asarray(hist, dtype=np.float64)
    max_abs, exponent = np.broadcast_arrays(np.asarray(max_abs, dtype=np.float64), np.asarray(exponent, np.int64))
    shape = np.broadcast_shapes(hist.shape[:-1], max_abs.shape)
    hist = np.broadcast_to(hist, (*shape, hist.shape[-1]))
    max_abs, exponent = np.broadcast_to(max_abs, shape), np.broadcast_to(exponent, shape)
    cumulative = np.cumsum(hist, axis=-1)
    total = cumulative[..., -1]
    # Bin i holds [2**(i + MIN), 2**(i + MIN + 1)) (bin 0 also everything smaller), so values
    # below 2**e are the bins i <= e - MIN - 1.
    last = exponent - layout.HIST_MIN_EXPONENT - 1
    inside = np.clip(last, 0, layout.NUM_BINS - 2)
    counted = np.take_along_axis(cumulative, inside[..., None], axis=-1)[..., 0]
    counted = np.where(last < 0, 0.0, counted)
    with np.errstate(over="ignore"):
        everything = max_abs < np.ldexp(1.0, exponent)
    return np.where(everything, total, counted)


def below_normal(hist: np.ndarray, max_abs: np.ndarray, fmt: NumberFormat) -> np.ndarray:
    """Finite non-zero values below ``fmt``'s smallest normal number (subnormal in ``fmt``)."""
    return count_below(hist, max_abs, np.full(np.shape(max_abs), _exponent(fmt.min_normal)))


def _exponent(power_of_two: float) -> int:
    mantissa, exponent = math.frexp(power_of_two)
    if mantissa != 0.5:
        raise ValueError(f"{power_of_two} is not a power of two")
    return exponent - 1


def amax_scale_exponent(max_abs: np.ndarray, fmt: NumberFormat) -> np.ndarray:
    """The ``k`` of per-tensor amax scaling by ``2**k``: the largest integer with
    ``max_abs * 2**k <= fmt.max`` (0 where ``max_abs`` is 0 or not finite)."""
    max_abs = np.asarray(max_abs, dtype=np.float64)
    ok = np.isfinite(max_abs) & (max_abs > 0)
    # max_abs = m * 2**e and fmt.max = M * 2**E (0.5 <= m, M < 1): the ratio M / m lies in
    # (0.5, 2), so k = E - e, less one where M < m. Exponents only: no division to overflow.
    m, e = np.frexp(np.where(ok, max_abs, 1.0))
    big_m, big_e = math.frexp(fmt.max)
    k = big_e - e.astype(np.int64) - (big_m < m)
    return np.where(ok, k, 0)


def fp8_counts(hist: np.ndarray, max_abs: np.ndarray, fmt: NumberFormat) -> tuple[np.ndarray, np.ndarray]:
    """``(flushed, subnormal)``: finite non-zero values that per-tensor power-of-two amax
    scaling into ``fmt`` would round to zero, and those it would leave subnormal (module
    docstring), as float64 ``(...)`` counts."""
    k = amax_scale_exponent(max_abs, fmt)
    flushed = count_below(hist, max_abs, _exponent(fmt.flush_below) - k)
    below = count_below(hist, max_abs, _exponent(fmt.min_normal) - k)
    return flushed, below - flushed


def quantization_noise(hist: np.ndarray, max_abs: np.ndarray, fmt: NumberFormat) -> np.ndarray:
    """Estimated ``Σ (q(x) - x)**2`` of rows cast to ``fmt`` with per-tensor power-of-two amax
    scaling (as :func:`fp8_counts`), from their binade histograms: float64 ``(...)``.

    The standard rounding-noise model, per binade: a value that keeps a non-zero code is off
    by a rounding error uniform over its spacing ``ulp`` (``ulp**2 / 12``; the spacing is
    ``2**(e - mantissa_bits)`` in binade ``[2**e, 2**(e+1))`` of the scaled value, the smallest
    subnormal below the smallest normal); a value flushed to zero loses itself, counted as the
    mean square of a value uniform in its binade (``7/3 * 4**e``). Divide by the rows' sum of
    squares for the relative noise (noise-to-signal ratio); it is an estimate, not a bound.
    """
    hist = np.asarray(hist, dtype=np.float64)
    k = amax_scale_exponent(max_abs, fmt)[..., None]  # the scale is 2**k
    lower = np.arange(layout.NUM_BINS) + layout.HIST_MIN_EXPONENT  # each bin's lower edge's exponent
    scaled = lower + k  # the binade of the scaled values
    flushed = scaled < _exponent(fmt.flush_below)
    subnormal = scaled < _exponent(fmt.min_normal)
    ulp_exponent = np.where(subnormal, _exponent(fmt.min_subnormal), scaled - fmt.mantissa_bits) - k
    kept_error = np.ldexp(1.0, 2 * ulp_exponent) / 12
    lost = np.ldexp(7 / 3, 2 * lower)
    return (hist * np.where(flushed, lost, kept_error)).sum(axis=-1)


def fp8_fields(hist: np.ndarray, max_abs: np.ndarray) -> dict[str, np.ndarray]:
    """The :data:`FP8_FIELDS` of rows: fractions of each row's finite non-zero elements
    (NaN where a row has none, or where ``hist``/``max_abs`` are NaN)."""
    hist = np.asarray(hist, dtype=np.float64)
    max_abs = np.asarray(max_abs, dtype=np.float64)
    nonzero = hist.sum(axis=-1)
    known = np.isfinite(nonzero) & np.isfinite(max_abs) & (nonzero > 0)
    safe_hist = np.where(np.isfinite(hist), hist, 0.0)
    safe_max = np.where(np.isfinite(max_abs), max_abs, 0.0)
    out = {}
    for short, fmt in FP8_FORMATS.items():
        flushed, subnormal = fp8_counts(safe_hist, safe_max, fmt)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"fp8_{short}_zero"] = np.where(known, flushed / nonzero, np.nan)
            out[f"fp8_{short}_subnormal"] = np.where(known, subnormal / nonzero, np.nan)
    return out
