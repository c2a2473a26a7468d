"""First divergence: the first step at which two runs' statistics differ, and where.

Two runs that should be identical (the same seed and code, a refactor, a new library version)
are compared step by step over the steps both histories keep:

* **gradient rows**: each shared layer's statistics columns (:data:`COLUMNS`: element count,
  sum, sum of squares, largest magnitude, zero, NaN and Inf counts) and presence, at every
  sampled step both runs have; histograms are left out (the scalars already change with
  any element);
* **forward rows** (both runs with ``watch(..., forward=True)``): each shared module's
  output statistics, at the sampled steps both have;
* **metrics**: ``loss`` and every metric both runs logged, at every step both have
  (``step_time``, memory and energy are measurements of the machine, not of the run: left out).

**Tolerance**: two values are the same when both are NaN, or equal, or (unless ``exact``)
``|a - b| <= rtol * max(|a|, |b|)``; for the ``sum`` column, whose terms cancel,
``rtol * sqrt(numel * sumsq)`` (the largest ``|sum|`` the elements allow: Cauchy-Schwarz)
takes the place of ``max(|a|, |b|)``. ``exact=True`` asks for bit-for-bit equality (NaN equals NaN).

**Where**: the divergence step is the first step at which anything differs. At that step, if
module outputs differ, the first of them in forward order (the order modules returned in
the reference run's forward record) is named, ``pass_="forward"``: the module whose own
computation changed. Otherwise, if gradient rows differ, the first in backward order (the
order their gradients became final in the reference run; 0 is nearest the loss; unknown
orders, as in ``mode="step"``, come last, in reverse model order), ``pass_="backward"``.
Otherwise only metrics differ: ``pass_="metrics"``, no layer. Note that a change in one
module changes the gradients of every layer before it and after it: the first in backward
order is then the last layer, not the module that changed; forward statistics name it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradscope.comparison.runs import ComparedRun, metric_names
from gradscope.stats import layout

COLUMNS = layout.SCALAR_FIELDS
"""The statistics columns compared (per gradient row and per module output)."""

RTOL = 1e-6
"""Default relative tolerance (module docstring)."""

MACHINE_FIELDS = ("step_time", "peak_memory", "energy", "grad_scale")
"""Per-step values that are not compared (measurements of the machine, or the scaler's state)."""


@dataclass(frozen=True)
class Divergence:
    """Where two runs first differ (module docstring).

    Attributes:
        reference, run: the two runs' labels (``run`` compared against ``reference``).
        step: the first step at which they differ.
        pass_: ``"forward"`` (a module's outputs), ``"backward"`` (a layer's gradient) or
            ``"metrics"`` (only logged values); also readable as ``getattr(d, "pass")`` and
            as ``"pass"`` in :meth:`to_dict`.
        layer: the module (forward) or gradient row (backward) named; None for metrics.
        statistic: the first column that differs there (``"sum"``...), or the metric's name.
        reference_value, run_value: its value in each run.
        metrics: the metrics that also differ at ``step``.
        tolerance: ``"exact"`` or ``"rtol=1e-06"``.
    """

    reference: str
    run: str
    step: int
    pass_: str
    layer: str | None
    statistic: str
    reference_value: float
    run_value: float
    metrics: tuple[str, ...] = ()
    tolerance: str = f"rtol={RTOL:g}"

    @property
    def message(self) -> str:
        """One sentence for a reader."""
        values = f"{self.statistic} {self.reference_value:.9g} vs {self.run_value:.9g}"
        if self.pass_ == "forward":
            where = f"in the forward pass: the outputs of module {self.layer!r} differ ({values})"
        elif self.pass_ == "backward":
            where = f"in the backward pass: the gradient of {self.layer!r} differs first in backward order ({values})"
        else:
            where = f"in the logged values ({values}); the statistics kept do not differ there"
        also = [m for m in self.metrics if m != self.statistic]
        tail = f"; {', '.join(also)} differ{'s' if len(also) == 1 else ''} too" if also else ""
        return f"{self.run} first differs from {self.reference} at step {self.step} {where}{tail} ({self.tolerance})"

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        return {
            "reference": self.reference,
            "run": self.run,
            "step": self.step,
            "pass": self.pass_,
            "layer": self.layer,
            "statistic": self.statistic,
            "reference_value": self.reference_value,
            "run_value": self.run_value,
            "metrics": list(self.metrics),
            "tolerance": self.tolerance,
            "message": self.message,
        }


setattr(Divergence, "pass", property(lambda self: self.pass_, doc="``pass_`` (``pass`` is a Python keyword)."))


def same(a: np.ndarray, b: np.ndarray, rtol: float | None, scale: np.ndarray | None = None) -> np.ndarray:
    """Elementwise: whether ``a`` and ``b`` are the same value under the tolerance rule
    (module docstring); ``rtol=None`` is bit for bit; ``scale`` replaces ``max(|a|, |b|)``."""
    with np.errstate(invalid="ignore", over="ignore"):
        equal = (a == b) | (np.isnan(a) & np.isnan(b))
        if rtol is None:
            return equal
        if scale is None:
            scale = np.maximum(np.abs(a), np.abs(b))
        close = np.isfinite(a) & np.isfinite(b) & (np.abs(a - b) <= rtol * scale)  # inf is only ever equal
        return equal | close


def _aligned(a: ComparedRun, b: ComparedRun, field: str, names: tuple[str, ...] | None):
    """``(steps, a_values, b_values)`` of a history field at the steps both runs keep (and,
    per-row fields, over ``names``, in that order)."""
    va, sa, ra = a.run.history(field)
    vb, sb, rb = b.run.history(field)
    steps, ia, ib = np.intersect1d(sa, sb, return_indices=True)
    va, vb = np.asarray(va, dtype=np.float64)[ia], np.asarray(vb, dtype=np.float64)[ib]
    if names is not None:
        va = va[:, [list(ra).index(n) for n in names]] if len(names) else va[:, :0]
        vb = vb[:, [list(rb).index(n) for n in names]] if len(names) else vb[:, :0]
    return steps, va, vb


def _row_differences(a, b, prefix: str, names, rtol):
    """``(steps, differ (S, N, C) bool, a columns, b columns)`` of per-row statistics
    ``prefix + column`` over ``names``."""
    found = {c: _aligned(a, b, prefix + c, names) for c in COLUMNS}
    steps = found[COLUMNS[0]][0]
    stack_a = np.stack([found[c][1] for c in COLUMNS], axis=-1)
    stack_b = np.stack([found[c][2] for c in COLUMNS], axis=-1)
    differ = ~same(stack_a, stack_b, rtol)
    s = COLUMNS.index("sum")
    with np.errstate(invalid="ignore"):
        bound = np.fmax(
            np.sqrt(stack_a[..., COLUMNS.index("numel")] * stack_a[..., COLUMNS.index("sumsq")]),
            np.sqrt(stack_b[..., COLUMNS.index("numel")] * stack_b[..., COLUMNS.index("sumsq")]),
        )
    differ[..., s] = ~same(stack_a[..., s], stack_b[..., s], rtol, bound)
    return steps, differ, stack_a, stack_b


def _order_at(compared: ComparedRun, field: str, step: int, names) -> np.ndarray:
    """``field`` (an order) at ``step`` over ``names``: float64, NaN or -1 where unknown."""
    values, steps, rows = compared.run.history(field)
    at = np.flatnonzero(steps == step)
    where = {n: i for i, n in enumerate(rows)}
    return np.asarray(values, dtype=np.float64)[at[0], [where[n] for n in names]]


def _first_in_order(candidates: np.ndarray, order: np.ndarray) -> int:
    """Of the indices ``candidates``, the first in ``order`` (unknown orders last, latest index first)."""
    known = candidates[np.isfinite(order[candidates]) & (order[candidates] >= 0)]
    if len(known):
        return int(known[np.argmin(order[known])])
    return int(candidates[-1])


def first_divergence(
    a: ComparedRun, b: ComparedRun, rows: tuple[str, ...], rtol: float | None = RTOL
) -> Divergence | None:
    """Where run ``b`` first differs from the reference ``a`` (module docstring), over the
    layers ``rows``; None when nothing kept differs. ``rtol=None``: bit for bit."""
    tolerance = "exact" if rtol is None else f"rtol={rtol:g}"
    firsts = []
    g_steps, g_differ, g_a, g_b = _row_differences(a, b, "", rows, rtol)
    g_any = g_differ.any(axis=(1, 2))
    if g_any.any():
        firsts.append(int(g_steps[np.argmax(g_any)]))
    modules = ()
    if a.run.info.modules and b.run.info.modules:
        modules = tuple(m for m in a.run.info.modules if m in set(b.run.info.modules))
        f_steps, f_differ, f_a, f_b = _row_differences(a, b, "forward_", modules, rtol)
        f_any = f_differ.any(axis=(1, 2))
        if f_any.any():
            firsts.append(int(f_steps[np.argmax(f_any)]))
    metrics = sorted(set(metric_names(a)) & set(metric_names(b)) - set(MACHINE_FIELDS), key=lambda m: (m != "loss", m))
    metric_at = {}
    for name in metrics:
        steps, va, vb = _aligned(a, b, name, None)
        off = ~same(va, vb, rtol)
        if off.any():
            i = int(np.argmax(off))
            metric_at[name] = (int(steps[i]), float(va[i]), float(vb[i]))
    firsts += [step for step, _, _ in metric_at.values()]
    if not firsts:
        return None
    step = min(firsts)
    also = tuple(name for name, (s, _, _) in metric_at.items() if s == step)
    common = {"reference": a.label, "run": b.label, "step": step, "metrics": also, "tolerance": tolerance}
    passes = [("backward", g_steps, g_differ, g_a, g_b, rows, "backward_order")]
    if modules:  # a module's own outputs first: the change was born there
        passes.insert(0, ("forward", f_steps, f_differ, f_a, f_b, modules, "forward_order"))
    for pass_, pass_steps, differ, values_a, values_b, names, order_field in passes:
        at = np.flatnonzero(pass_steps == step)
        if len(at) and differ[at[0]].any():
            i = at[0]
            first = _first_in_order(np.flatnonzero(differ[i].any(axis=1)), _order_at(a, order_field, step, names))
            c = int(np.argmax(differ[i, first]))
            values = float(values_a[i, first, c]), float(values_b[i, first, c])
            return Divergence(pass_=pass_, layer=names[first], statistic=COLUMNS[c], **common, **_v(values))
    name = also[0]
    return Divergence(pass_="metrics", layer=None, statistic=name, **common, **_v(metric_at[name][1:]))


def _v(values: tuple[float, float]) -> dict:
    return {"reference_value": values[0], "run_value": values[1]}
