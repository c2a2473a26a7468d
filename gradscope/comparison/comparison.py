"""``gradscope.compare(*runs)``: runs side by side, as one :class:`Comparison`.

::

    cmp = gradscope.compare("runs/fold0", "runs/fold1", "runs/fold2", by="lr")
    print(cmp)                      # the summary, the layers, the first divergence
    cmp.metrics["val_loss"].groups  # mean and std of the folds' best val_loss, per lr
    cmp.divergence                  # where fold1 first differs from fold0, or None
    cmp.to_dict()                   # all of it, as JSON values
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from gradscope.comparison.divergence import RTOL, Divergence, first_divergence
from gradscope.comparison.layers import STATISTIC, LayerTable, layer_table
from gradscope.comparison.runs import ComparedRun, common_rows, group_runs, load_runs
from gradscope.comparison.summary import GapSummary, MetricSummary, Spread, summarise
from gradscope.health.readout import RunReadout


class Comparison:
    """Several runs compared (see :func:`compare`).

    Attributes:
        runs: the runs compared (:class:`~gradscope.comparison.runs.ComparedRun`: label, run,
            path), the reference (the first) first.
        labels: their labels, in that order.
        by: the tag the runs are grouped by (None: one group).
        groups: ``(tag value, runs)`` per group.
        rows: the layers compared (those every run has).
        notes: what a reader must know (layers left out...).
        metrics: name -> :class:`~gradscope.comparison.summary.MetricSummary` (``loss`` first).
        gaps: the generalisation gaps (:class:`~gradscope.comparison.summary.GapSummary`).
        layers: the per-layer table (:class:`~gradscope.comparison.layers.LayerTable`).
        exact, rtol: the divergence tolerance (``rtol`` None when ``exact``).
    """

    def __init__(self, runs: list[ComparedRun], by: str | None, exact: bool, rtol: float) -> None:
        self.runs = runs
        self.labels = tuple(r.label for r in runs)
        self.by = by
        self.groups = group_runs(runs, by)
        self.rows, notes = common_rows(runs)
        self.notes = list(notes)
        metrics, self.gaps = summarise(runs, self.groups)
        self.metrics = {m.name: m for m in metrics}
        self.layers: LayerTable = layer_table(runs, self.rows)
        self.exact = exact
        self.rtol = None if exact else rtol

    @functools.cached_property
    def divergences(self) -> dict[str, Divergence | None]:
        """Run label -> where it first differs from the reference run (the first one), or None
        where it does not; computed on first use. Raises ValueError with a single run."""
        if len(self.runs) < 2:
            raise ValueError(
                f"gradscope.compare: divergence needs two runs or more, got 1 ({self.labels[0]}): "
                "it compares each run with the first"
            )
        reference = self.runs[0]
        return {r.label: first_divergence(reference, r, self.rows, self.rtol) for r in self.runs[1:]}

    @property
    def divergence(self) -> Divergence | None:
        """Where the runs first differ: with two runs, where the second differs from the first;
        with more, the earliest of :attr:`divergences` (each run against the first, the
        reference; ties: the first run given). None when every run matches the reference.
        Raises ValueError with a single run."""
        found = [d for d in self.divergences.values() if d is not None]
        return min(found, key=lambda d: d.step) if found else None

    def to_dict(self) -> dict:
        """The whole comparison as JSON values (NaN and Inf as None): runs, metrics with each
        run's values and each group's mean and std, gaps, the per-layer table, divergences."""
        divergences = self.divergences if len(self.runs) > 1 else {}
        first = self.divergence if len(self.runs) > 1 else None
        return _json(
            {
                "runs": [{"label": r.label, "path": r.path, "tags": dict(r.tags)} for r in self.runs],
                "reference": self.labels[0],
                "by": self.by,
                "groups": [{"key": key, "runs": [r.label for r in members]} for key, members in self.groups],
                "notes": self.notes,
                "metrics": {name: _metric_dict(m) for name, m in self.metrics.items()},
                "gaps": [_gap_dict(g) for g in self.gaps],
                "layers": _layers_dict(self.layers),
                "divergence": None if first is None else first.to_dict(),
                "divergences": {label: None if d is None else d.to_dict() for label, d in divergences.items()},
                "tolerance": {"exact": self.exact, "rtol": self.rtol},
            }
        )

    def __str__(self) -> str:
        from gradscope.comparison.text import format_comparison

        return format_comparison(self)

    def __repr__(self) -> str:
        return f"<gradscope.Comparison of {len(self.runs)} runs, {len(self.rows)} layers>"


def compare(
    *runs: str | os.PathLike | RunReadout, by: str | None = None, exact: bool = False, rtol: float = RTOL
) -> Comparison:
    """Compare runs: folds of a cross-validation, seeds, a sweep, or a run and its regression.

    Args:
        runs: run-log directories (``watch(..., log_dir=...)``) or files, or runs already loaded
            (:func:`gradscope.load_run`); the first is the reference.
        by: group the runs by the value of this tag (``watch(..., tags={"fold": 2})``); the
            summary is then per group. Runs without the tag form one more group.
        exact: first divergence bit for bit (NaN equals NaN) instead of within ``rtol``.
        rtol: relative tolerance of the first divergence (default 1e-6; see
            :mod:`gradscope.comparison.divergence`).

    Returns:
        A :class:`Comparison`: ``print`` it, read its ``metrics``, ``gaps``, ``layers`` and
        ``divergence``, or export it with ``to_dict()``. Layers not in every run are left out
        of the per-layer table and the divergence, and ``notes`` says so.

    Raises:
        ValueError: no runs, ``by`` names a tag no run has, a negative or non-finite ``rtol``.
        TypeError: a run that is neither a path nor a loaded run.
        FileNotFoundError, gradscope.RunLogError: a path that is not a run log.
    """
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < math.inf:
        raise ValueError(f"gradscope.compare: rtol must be a finite number >= 0, got {rtol!r}")
    if not isinstance(exact, bool):
        raise TypeError(f"gradscope.compare: exact must be True or False, got {exact!r}")
    return Comparison(load_runs(runs), by, exact, float(rtol))


def _spread(spread: Spread | None) -> dict | None:
    return None if spread is None else {"mean": spread.mean, "std": spread.std, "n": spread.n, "ddof": 1}


def _metric_dict(m: MetricSummary) -> dict:
    return {
        "direction": {1: "max", -1: "min", 0: None}[m.direction],
        "runs": {label: vars(values).copy() for label, values in m.runs.items()},
        "groups": [
            {
                "key": g.key,
                "runs": list(g.runs),
                "best": _spread(g.best),
                "final": _spread(g.final),
                "robust_z": g.robust_z,
                "outliers": list(g.outliers),
            }
            for g in m.groups
        ],
    }


def _gap_dict(g: GapSummary) -> dict:
    return {
        "train": g.train,
        "validation": g.validation,
        "runs": g.runs,
        "groups": [{"key": key, "runs": list(labels), "gap": _spread(s)} for key, labels, s in g.groups],
    }


def _layers_dict(t: LayerTable) -> dict:
    return {
        "statistic": STATISTIC,
        "rows": list(t.rows),
        "steps": t.steps.tolist(),
        "runs": {
            label: {
                "final": t.final[r].tolist(),
                "median": t.median[r].tolist(),
                "ratio": t.ratio[r].tolist(),
                "norms": t.norms[r].tolist(),
            }
            for r, label in enumerate(t.runs)
        },
    }


def _json(value):
    """``value`` with NaN/Inf floats as None and NumPy scalars as Python ones (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
