"""Compression readiness: what could be quantized or pruned, from the run's weight readings.

``watch(..., compression=True)`` reads the weights on sampled steps
(:mod:`gradscope.monitor.weights`, folded by :mod:`gradscope.run.weights`). From that this
module judges, per layer:

**Quantization readiness** of the layer's matrices (parameters with ``ndim >= 2``; biases and
normalisation scales stay in their training precision in every common recipe), each tensor
cast with its own per-tensor power-of-two amax scale (:mod:`gradscope.stats.formats`), from
the newest reading's exact binade histograms:

* ``flushed``: the fraction of the non-zero weights that round to zero;
* ``subnormal``: (FP8) the fraction that lands among the format's subnormals, with fewer
  significant bits;
* ``noise``: the estimated relative quantization noise ``Σ (q(w) - w)² / Σ w²``
  (:func:`gradscope.stats.formats.quantization_noise`; the SQNR in dB is ``-10 log10(noise)``).

A format is **ready** for a layer when its noise is at most :data:`READY_NOISE` (SQNR ≥ 30 dB).
When it is not, but would be without the layer's largest :data:`OUTLIER_SHARE` of weights
(the per-tensor scale then comes from the rest), the outliers are what stands in the way:
**per-channel scaling needed** (or per-block scaling, or handling the outliers apart). When
even the bulk of the weights is too wide: **keep in 16-bit**. The layer's verdict is the best
over the 8-bit weight formats INT8 and FP8 E4M3 (``format`` names the ready one with the
least noise); FP8 E5M2, with two mantissa bits, is reported but is a format for gradients
(its noise is about 3e-3 for any weights).

**Pruning saliency**: the first-order Taylor estimate of what removing the layer would cost,
``Σ_steps |Σ g·w|`` over the readings (``saliency``), the elementwise second-order one,
``Σ_steps Σ (g·w)²`` (``fisher``: the empirical-Fisher, Optimal Brain Damage estimate), and
both per element (``/ numel``). ``least_important`` lists the layers from the lowest
``saliency`` up (:data:`RANK_BY` says why, and where ``fisher`` ranks better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradscope.run.weights import WeightState
from gradscope.stats import formats, layout

READY_NOISE = 1e-3
"""Largest relative quantization noise (``Σ (q(w) - w)² / Σ w²``) of a ready layer: SQNR 30 dB."""

OUTLIER_SHARE = 1e-3
"""The share of a tensor's largest weights treated as outliers when asking whether
per-channel scaling would do (0.1%)."""

QUANT_FORMATS = {"int8": formats.INT8, "fp8_e4m3": formats.E4M3, "fp8_e5m2": formats.E5M2}
"""The formats judged, by report name."""

VERDICT_FORMATS = ("int8", "fp8_e4m3")
"""The 8-bit weight formats a layer's verdict chooses from."""

RANK_BY = "saliency"
"""Which estimate orders ``least_important``: ``"saliency"`` (``Σ_steps |Σ g·w|``, the layer
as one group) or ``"fisher"`` (``Σ_steps Σ (g·w)²``, element by element). The group term, as
``benchmarks/bench_compression.py`` found: in a GPT-2 whose blocks matter it names the layers
that can be removed or sparsified at no cost, where the elementwise term names the last
block's MLP (removing it costs 0.8 nats), a layer whose per-element gradients are small
because it has converged. In a ReLU MLP without normalisation or residual path the group term
cannot rank (scaling any layer's weights scales the output alike, so ``Σ g·w`` is nearly the
same for all) and the elementwise term does better there; both are reported."""

VERDICTS = ("ready", "per-channel scaling needed", "keep in 16-bit")


@dataclass(frozen=True)
class LayerCompression:
    """One layer's compression readiness (module docstring).

    Attributes:
        name, type: the report row and its module's class.
        numel: the layer's weights (all its watched parameters).
        quantized_numel: the elements of its matrices (``ndim >= 2``), the ones judged for
            quantization (0: nothing to quantize, ``verdict`` None).
        verdict: one of :data:`VERDICTS`, or None.
        format: the ready format with the least noise (``"int8"``, ``"fp8_e4m3"``), or None.
        reason: why, in one sentence with the numbers.
        formats: per format of :data:`QUANT_FORMATS`: ``flushed``, ``subnormal`` (fractions
            of the non-zero weights), ``noise`` (relative), ``bulk_noise`` (the same without
            the outliers, coarser: the bulk's sum of squares is estimated from its binades,
            within about 25% for a Gaussian bulk) and ``verdict``.
        saliency: ``Σ_steps |Σ g·w|`` over the readings (loss units, summed over readings).
        saliency_per_element: ``saliency / numel``.
        fisher: ``Σ_steps Σ (g·w)²`` over the readings: the elementwise second-order
            (empirical-Fisher, Optimal Brain Damage) estimate of what zeroing the layer's
            elements costs, up to a constant.
        fisher_per_element: ``fisher / numel``.
        saliency_rank: the layer's place in ``least_important`` (1: the least important).
    """

    name: str
    type: str
    numel: int
    quantized_numel: int
    verdict: str | None
    format: str | None
    reason: str
    formats: dict
    saliency: float
    saliency_per_element: float
    fisher: float
    fisher_per_element: float
    saliency_rank: int

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class CompressionReport:
    """The report's ``compression`` section: per-layer readiness and the saliency ranking.

    Attributes:
        step: the newest weight reading's step (the weights judged for quantization).
        readings: how many readings the saliency sums.
        layers: one :class:`LayerCompression` per report row.
        least_important: layer names, lowest saliency first.
    """

    step: int
    readings: int
    layers: tuple[LayerCompression, ...]
    least_important: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "readings": self.readings,
            "ready_noise": READY_NOISE,
            "layers": [layer.to_dict() for layer in self.layers],
            "least_important": list(self.least_important),
        }

    def __str__(self) -> str:
        counts = {v: sum(layer.verdict == v for layer in self.layers) for v in VERDICTS}
        lines = [
            f"  compression (weights at step {self.step}, saliency over {self.readings} readings): "
            + ", ".join(f"{n} {v}" for v, n in counts.items())
        ]
        for layer in self.layers:
            if layer.verdict not in (None, "ready"):
                lines.append(f"    {layer.name}: {layer.verdict}: {layer.reason}")
        if self.least_important:
            shown = ", ".join(self.least_important[:5])
            lines.append(f"    least important (lowest Taylor saliency Σ|Σ g·w|): {shown}")
        return "\n".join(lines)


def judge_compression(state: WeightState | None, rows: tuple[str, ...], row_types: tuple[str, ...]):
    """The :class:`CompressionReport` of a run's weight readings (None without any)."""
    if state is None or state.step < 0:
        return None
    n_rows = len(rows)
    numel = np.bincount(state.row_of, weights=state.rows[:, layout.NUMEL], minlength=n_rows)
    matrices = state.ndim >= 2
    owner, tensor_rows = state.row_of[matrices], state.rows[matrices]
    has_matrix = np.bincount(owner, minlength=n_rows) > 0
    combined = _combined_rows(tensor_rows, owner, n_rows)  # each layer's matrices as one row
    per_format = {}
    for short, fmt in QUANT_FORMATS.items():  # figures add over a layer's tensors
        per_format[short] = np.zeros((n_rows, 5))
        np.add.at(per_format[short], owner, _tensor_figures(tensor_rows, fmt))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_element = np.where(numel > 0, state.saliency / numel, np.nan)
        fisher_per_element = np.where(numel > 0, state.fisher / numel, np.nan)
    order = np.argsort(state.saliency if RANK_BY == "saliency" else state.fisher, kind="stable")
    rank = np.empty(n_rows, dtype=np.int64)
    rank[order] = np.arange(1, n_rows + 1)
    layers = []
    for r in range(n_rows):
        mine = slice(r, r + 1) if has_matrix[r] else slice(0, 0)
        judged = _judge_layer(combined[mine], {short: figures[mine] for short, figures in per_format.items()})
        layers.append(
            LayerCompression(
                name=rows[r],
                type=row_types[r],
                numel=int(numel[r]),
                quantized_numel=int(combined[r, layout.NUMEL]),
                saliency=float(state.saliency[r]),
                saliency_per_element=float(per_element[r]),
                fisher=float(state.fisher[r]),
                fisher_per_element=float(fisher_per_element[r]),
                saliency_rank=int(rank[r]),
                **judged,
            )
        )
    return CompressionReport(state.step, state.readings, tuple(layers), tuple(rows[r] for r in order))


def _combined_rows(rows: np.ndarray, owner: np.ndarray, n_rows: int) -> np.ndarray:
    """float64 ``(n_rows, ROW_WIDTH)``: the rows of each owner's tensors combined as one tensor
    (:data:`gradscope.stats.layout.COMBINE`); zeros for an owner without any."""
    combined = np.zeros((n_rows, layout.ROW_WIDTH))
    summed = np.zeros((n_rows, len(layout.SUM_COLUMNS)))
    np.add.at(summed, owner, rows[:, layout.SUM_COLUMNS])
    largest = np.zeros((n_rows, len(layout.MAX_COLUMNS)))
    np.maximum.at(largest, owner, rows[:, layout.MAX_COLUMNS])
    combined[:, layout.SUM_COLUMNS], combined[:, layout.MAX_COLUMNS] = summed, largest
    return combined


def layer_noise(rows: np.ndarray, row_of: np.ndarray, ndim: np.ndarray, n_rows: int) -> dict[str, np.ndarray]:
    """Per report row, each format's relative quantization noise of its matrices (float64
    ``(R,)`` per format of :data:`QUANT_FORMATS`; NaN for rows without a non-zero matrix):
    what the exporters chart at each weight reading."""
    matrices = ndim >= 2
    sumsq = np.bincount(row_of[matrices], weights=rows[matrices, layout.SUMSQ], minlength=n_rows)
    out = {}
    for short, fmt in QUANT_FORMATS.items():
        noise = _tensor_figures(rows[matrices], fmt)[:, 2]
        total = np.bincount(row_of[matrices], weights=noise, minlength=n_rows)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[short] = np.where(sumsq > 0, total / sumsq, np.nan)
    return out


def _tensor_figures(rows: np.ndarray, fmt: formats.NumberFormat) -> np.ndarray:
    """float64 ``(T, 5)`` per tensor: flushed count, subnormal count, noise, bulk noise, bulk
    sum of squares (the bulk: the tensor without its largest :data:`OUTLIER_SHARE`)."""
    hist = np.nan_to_num(rows[:, layout.HIST :])
    max_abs = np.nan_to_num(rows[:, layout.MAX_ABS])
    flushed, subnormal = formats.fp8_counts(hist, max_abs, fmt)
    noise = formats.quantization_noise(hist, max_abs, fmt)
    # The bulk: drop the top bins that hold at most OUTLIER_SHARE of the non-zero values.
    from_top = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # values in this bin and above
    allowed = OUTLIER_SHARE * hist.sum(axis=1, keepdims=True)
    bulk = np.where(from_top <= allowed, 0.0, hist)  # a suffix of bins: the top values, up to the share
    kept = bulk > 0
    top = np.where(kept.any(axis=1), layout.NUM_BINS - 1 - np.argmax(kept[:, ::-1], axis=1), 0)  # last kept bin
    bulk_max = np.nextafter(np.ldexp(1.0, top + layout.HIST_MIN_EXPONENT + 1), 0)
    bulk_max = np.minimum(bulk_max, max_abs)
    bulk_noise = formats.quantization_noise(bulk, bulk_max, fmt)
    lower = np.arange(layout.NUM_BINS) + layout.HIST_MIN_EXPONENT
    bulk_sumsq = (bulk * np.ldexp(7 / 3, 2 * lower)).sum(axis=1)  # values uniform in their binade
    return np.stack([flushed, subnormal, noise, bulk_noise, bulk_sumsq], axis=1)


def _judge_layer(rows: np.ndarray, figures: dict[str, np.ndarray]) -> dict:
    """``verdict``, ``format``, ``reason`` and ``formats`` of one layer's matrices."""
    if not len(rows):
        return {"verdict": None, "format": None, "reason": "no matrix to quantize", "formats": {}}
    nonzero = np.nan_to_num(rows[:, layout.HIST :]).sum()
    sumsq = rows[:, layout.SUMSQ].sum()
    if (rows[:, layout.NANS] + rows[:, layout.INFS]).sum() > 0:
        return {"verdict": "keep in 16-bit", "format": None, "reason": "its weights hold NaN/Inf", "formats": {}}
    if rows[:, layout.MAX_ABS].max() >= layout.HIST_EDGES[-2]:  # the top bin holds everything above
        reason = f"weights reach {rows[:, layout.MAX_ABS].max():.3g}, beyond the histogram's range: not judged"
        return {"verdict": None, "format": None, "reason": reason, "formats": {}}
    if nonzero == 0 or not sumsq > 0:
        return {"verdict": None, "format": None, "reason": "its matrices are all zero", "formats": {}}
    out = {}
    for short, f in figures.items():
        flushed, subnormal, noise, bulk_noise, bulk_sumsq = f.sum(axis=0)
        noise, bulk_noise = noise / sumsq, bulk_noise / bulk_sumsq if bulk_sumsq > 0 else math.inf
        verdict = VERDICTS[0] if noise <= READY_NOISE else VERDICTS[1] if bulk_noise <= READY_NOISE else VERDICTS[2]
        out[short] = {
            "flushed": flushed / nonzero,
            "subnormal": subnormal / nonzero if QUANT_FORMATS[short].mantissa_bits else 0.0,
            "noise": noise,
            "bulk_noise": bulk_noise,
            "verdict": verdict,
        }
    ready = [short for short in VERDICT_FORMATS if out[short]["verdict"] == VERDICTS[0]]
    if ready:
        best = min(ready, key=lambda short: out[short]["noise"])
        figures_of = out[best]
        reason = (
            f"{_label(best)} with a per-tensor scale: relative noise {figures_of['noise']:.1e} "
            f"(SQNR {_db(figures_of['noise']):.0f} dB), {100 * figures_of['flushed']:.2g}% of weights flushed to zero"
        )
        return {"verdict": VERDICTS[0], "format": best, "reason": reason, "formats": out}
    noises = ", ".join(f"{_label(s)} {out[s]['noise']:.1e}" for s in VERDICT_FORMATS)
    if any(out[s]["verdict"] == VERDICTS[1] for s in VERDICT_FORMATS):
        best = min(VERDICT_FORMATS, key=lambda s: out[s]["bulk_noise"])
        reason = (
            f"per-tensor relative noise {noises} (ready: ≤ {READY_NOISE:.0e}); without its largest "
            f"{100 * OUTLIER_SHARE:g}% of weights {_label(best)} would reach {out[best]['bulk_noise']:.1e}: "
            "a few outliers set the scale"
        )
        return {"verdict": VERDICTS[1], "format": None, "reason": reason, "formats": out}
    reason = (
        f"relative noise {noises} (ready: ≤ {READY_NOISE:.0e}), and no better without its largest "
        f"{100 * OUTLIER_SHARE:g}% of weights: the weights span too many binades for 8 bits"
    )
    return {"verdict": VERDICTS[2], "format": None, "reason": reason, "formats": out}


def _label(short: str) -> str:
    return {"int8": "INT8", "fp8_e4m3": "FP8 E4M3", "fp8_e5m2": "FP8 E5M2"}[short]


def _db(noise: float) -> float:
    return -10 * math.log10(noise) if noise > 0 else math.inf
