"""``underflow`` and ``overflow`` of low-precision number formats (float16, bfloat16), in
gradients and, with forward statistics, in activations — for pure low-precision training
too, not only under a GradScaler.

* **underflow, subnormal** — a float16 tensor with at least ``underflow_fraction`` of its
  finite non-zero values below float16's smallest normal (``2**-14``): they have lost
  precision, and one binade further down they flush to zero (exact, from the histogram).
* **underflow, flushed** — a low-precision gradient that is (almost) all exact zeros, step
  after step, while the model's other low-precision gradients are subnormal, or while every
  low-precision gradient of the model is all zeros (the layer nearest the loss included).
  Dead units (ReLUs that never fire) leave the gradients nearer the loss alive and in range;
  a gradient flushed by its format does not. These rows are not reported as ``dead``
  (:func:`flushed_rows` is what the ``dead`` check consults).
* **overflow** — a low-precision tensor whose largest finite value is within one binade of
  the format's largest (float16: at or above 32768): the next doubling is Inf.

bfloat16 has float32's exponent range: its subnormals (below ``2**-126``) lie below the
histogram's range, so the subnormal rule sees them only when a tensor's largest value is
itself below ``2**-126`` (every value is then subnormal); the flushed and overflow rules
apply as for float16.
"""

from __future__ import annotations

import numpy as np

from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, for_steps, layer_list, trailing_run
from gradscope.stats import formats, layout


def _low_precision(dtype: str) -> formats.NumberFormat | None:
    """The format of ``dtype`` when it is one gradscope judges (float16, bfloat16), else None."""
    fmt = formats.format_of(dtype)
    return fmt if fmt is not None and fmt.name in formats.LOW_PRECISION else None


def _formats(view: RunView) -> list[formats.NumberFormat | None]:
    if len(view.row_dtypes) != len(view.rows):
        return [None] * len(view.rows)
    return [_low_precision(dtype) for dtype in view.row_dtypes]


def _below_normal_fraction(hist: np.ndarray, max_abs: float, fmt: formats.NumberFormat) -> float | None:
    """Fraction of a row's finite non-zero values below ``fmt``'s smallest normal (None when
    the histogram is not kept or the row has no such values)."""
    if np.isnan(hist).any() or hist.sum() == 0:
        return None
    return float(formats.below_normal(hist, max_abs, fmt)) / float(hist.sum())


def subnormal_rows(view: RunView, t: Thresholds) -> dict[int, float]:
    """Rows whose newest histogram has at least ``underflow_fraction`` of its finite non-zero
    values below their low-precision format's smallest normal: ``{row: fraction}`` (the
    histogram's step is ``view.latest_hist_step[row]``)."""
    out = {}
    if view.latest_hist is None or len(view.sampled_steps) == 0:
        return out
    max_abs = view.latest_hist_max_abs
    for r, fmt in enumerate(_formats(view)):
        fraction = _below_normal_fraction(view.latest_hist[r], max_abs[r], fmt) if fmt is not None else None
        if fraction is not None and fraction >= t.underflow_fraction:
            out[r] = fraction
    return out


def flushed_rows(
    view: RunView, t: Thresholds, subnormal: dict[int, float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Low-precision rows whose all-zero gradients are underflow rather than dead units
    (module docstring): ``(rows, run lengths, run starts)``. ``subnormal``: the rows'
    :func:`subnormal_rows`, when already known."""
    empty = np.zeros(0, dtype=np.int64)
    if len(view.sampled_steps) == 0:
        return empty, empty, empty
    low = np.array([f is not None for f in _formats(view)])
    if not low.any():
        return empty, empty, empty
    with np.errstate(invalid="ignore"):
        run, start = trailing_run(view.zero_frac >= t.dead_zero_frac, view.present)
    zeroed = low & (run >= t.sustain)
    seen = view.present.any(axis=0)
    everything = zeroed[low & seen].all()
    if not (everything or (subnormal if subnormal is not None else subnormal_rows(view, t))):
        return empty, empty, empty
    rows = np.flatnonzero(zeroed)
    return rows, run[rows], start[rows]


def _gradient_underflow(view: RunView, t: Thresholds) -> list[Finding]:
    findings = []
    fmts = _formats(view)
    subnormal = subnormal_rows(view, t)
    steps = view.sampled_steps
    last = int(steps[-1]) if len(steps) else 0
    root = None
    if subnormal:
        rows = sorted(subnormal, key=lambda r: -subnormal[r])
        names = [view.rows[r] for r in rows]
        fmt = fmts[rows[0]]
        seen_at = int(view.latest_hist_step[rows[0]])  # the histogram's step (a cadence)
        root = Finding(
            kind="underflow",
            severity="warning",
            layer=names[0],
            step=seen_at,
            since_step=seen_at,
            message=(
                f"{100 * subnormal[rows[0]]:.0f}% of the non-zero gradient values of '{names[0]}' are below "
                f"{fmt.name}'s smallest normal number ({fmt.min_normal:.3g}): they are losing precision and "
                "flushing to zero" + (f"; also {layer_list(names[1:])}" if len(names) > 1 else "")
            ),
            suggestion=SUGGESTIONS["underflow"],
            evidence={
                "pass": "backward",
                "dtype": fmt.name,
                "below_normal_fraction": {view.rows[r]: subnormal[r] for r in rows},
                "min_normal": fmt.min_normal,
                "hist_step": {view.rows[r]: int(view.latest_hist_step[r]) for r in rows},
            },
            layers=tuple(names),
        )
        findings.append(root)
    rows, run, start = flushed_rows(view, t, subnormal)
    if len(rows):
        names = [view.rows[r] for r in rows]
        fmt = fmts[rows[0]]
        cause = {"kind": root.kind, "layer": root.layer, "step": root.since_step} if root is not None else None
        why = (
            "while the gradients nearer the loss are already subnormal"
            if root is not None
            else "and so is every low-precision gradient of the model, the layer nearest the loss included"
        )
        findings.append(
            Finding(
                kind="underflow",
                severity="warning",
                layer=names[-1],
                step=last,
                since_step=int(steps[int(start.min())]),
                message=(
                    f"the {fmt.name} gradients of {layer_list(names)} are exact zeros "
                    f"{for_steps(int(run.min()), int(start.max()))} {why}: they underflowed (flushed to zero "
                    "by the format), not dead units"
                ),
                suggestion=SUGGESTIONS["underflow"],
                evidence={"pass": "backward", "dtype": fmt.name, "layers": names, "rule": "flushed"},
                layers=tuple(names),
                cause=cause,
            )
        )
    return findings


def _overflow(hits: list[tuple[str, formats.NumberFormat, float]], subject: str, pass_: str, step: int) -> Finding:
    """The ``overflow`` finding for ``(name, format, max_abs)`` hits, the first named in the
    message as ``subject`` ("gradient of 'x'", "output of module 'x'")."""
    name, fmt, value = hits[0]
    names = [hit[0] for hit in hits]
    return Finding(
        kind="overflow",
        severity="warning",
        layer=name,
        step=step,
        since_step=step,
        message=(
            f"the {fmt.name} {subject} reaches {value:.6g}, within one binade of "
            f"{fmt.name}'s largest value ({fmt.max:.6g}): the next doubling is Inf"
            + (f"; also {layer_list(names[1:])}" if len(names) > 1 else "")
        ),
        suggestion=SUGGESTIONS["overflow_format"],
        evidence={"pass": pass_, "dtype": fmt.name, "max_abs": {n: v for n, _, v in hits}},
        layers=tuple(names),
    )


def _gradient_overflow(view: RunView) -> list[Finding]:
    if len(view.sampled_steps) == 0:
        return []
    max_abs = view.latest(view.max_abs)
    hits = [
        (view.rows[r], fmt, float(max_abs[r]))
        for r, fmt in enumerate(_formats(view))
        if fmt is not None and max_abs[r] >= fmt.top_binade
    ]
    if not hits:
        return []
    return [_overflow(hits, f"gradient of '{hits[0][0]}'", "backward", int(view.sampled_steps[-1]))]


def _activations(view: RunView, t: Thresholds) -> list[Finding]:
    """Format trouble in the newest forward statistics (module outputs)."""
    record = view.forward_latest
    if record is None:
        return []
    findings = []
    outputs = record.outputs
    present = record.order[1] >= 0
    near_max, subnormal = [], []
    for m, dtype in enumerate(record.dtypes):
        fmt = _low_precision(dtype)
        if not present[m] or fmt is None:
            continue
        row = outputs[m]
        if row[layout.MAX_ABS] >= fmt.top_binade:
            near_max.append((view.modules[m], fmt, float(row[layout.MAX_ABS])))
        below = _below_normal_fraction(row[layout.HIST :], row[layout.MAX_ABS], fmt)
        if below is not None and below >= t.underflow_fraction:
            subnormal.append((m, fmt, below))
    where = f" (autocast {record.autocast})" if record.autocast else ""
    if near_max:
        findings.append(_overflow(near_max, f"output of module '{near_max[0][0]}'{where}", "forward", record.step))
    if subnormal:
        m, fmt, fraction = max(subnormal, key=lambda item: item[2])
        names = [view.modules[i] for i, _, _ in subnormal]
        findings.append(
            Finding(
                kind="underflow",
                severity="warning",
                layer=view.modules[m],
                step=record.step,
                since_step=record.step,
                message=(
                    f"{100 * fraction:.0f}% of the non-zero {fmt.name} outputs of module '{view.modules[m]}'{where} "
                    f"are below {fmt.name}'s smallest normal number ({fmt.min_normal:.3g})"
                    + (f"; also {layer_list([n for n in names if n != view.modules[m]])}" if len(names) > 1 else "")
                ),
                suggestion=SUGGESTIONS["underflow"],
                evidence={
                    "pass": "forward",
                    "dtype": fmt.name,
                    "below_normal_fraction": {view.modules[i]: f for i, _, f in subnormal},
                },
                layers=tuple(names),
            )
        )
    return findings


def detect(view: RunView, t: Thresholds) -> list[Finding]:
    return _gradient_underflow(view, t) + _gradient_overflow(view) + _activations(view, t)
