"""The cross-validation summary: each logged metric's best and final value per run, their mean
and standard deviation across runs, generalisation gaps, and the outlier run.

The rules, declared once (here, or where they already were):

* **Metrics**: the per-step ``loss`` and every metric the run logged (``mon.step(loss, **metrics)``,
  ``mon.log(...)``); NaN/Inf values are skipped.
* **Best**: the minimum of a metric where lower is better, the maximum where higher is better,
  by the health report's naming rule (:func:`gradscope.health.checks.loss.direction`: ``loss``/
  ``error`` lower, ``accuracy``/``f1``/``recall``/``precision`` higher, the same rule early
  stopping infers its direction with); a metric the rule cannot judge gets its final value only.
  **Final**: the last finite value logged.
* **Across runs**: the mean and the sample standard deviation (``ddof=1``, NaN for one run)
  of the runs' best (and final) values, per group when grouped by a tag: the k-fold estimate.
* **Generalisation gap**: training minus validation, each run's final values: a validation
  metric (``val_*``, ``valid_*``, ``validation_*``, ``eval_*``, ``test_*``) pairs with
  ``train_<name>``, else ``<name>`` (``val_loss`` with ``train_loss``, else the per-step
  ``loss``; :func:`gradscope.health.checks.loss.training_counterpart`, the overfitting check's
  pairing). For a loss a negative gap means the validation loss is higher.
* **Outlier**: with 3 runs or more in a group, a run whose best value is far from the others
  by two measures at once: its robust z-score ``0.6745 * (x - median) / MAD`` (Iglewicz and
  Hoaglin's modified z-score; MAD: the median absolute deviation from the median; where the
  MAD is 0, ``(x - median) / (1.2533 * mean absolute deviation)``) exceeds :data:`OUTLIER_Z`
  in magnitude, and so does its distance to the other runs' mean in their standard deviations
  (ddof=1). The first keeps the outlier from widening the yardstick it is measured with; the
  second keeps a few folds that happen to agree closely (a tiny MAD, common with 3 to 5
  folds) from making every other fold an outlier. And it must be off the median by more than
  :data:`OUTLIER_MIN_RELATIVE` of it: folds a rounding error apart are not outliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradscope.comparison.runs import ComparedRun, metric_names
from gradscope.health.checks.loss import direction, training_counterpart

OUTLIER_Z = 3.5
"""Robust z-score above which a run's best value marks it as the outlier (Iglewicz and Hoaglin)."""

OUTLIER_MIN_RELATIVE = 1e-3
"""An outlier's best value is off the median by more than this fraction of the median's magnitude."""

MIN_RUNS_FOR_OUTLIERS = 3
"""Runs a group needs before any is called an outlier (with two, neither is more typical)."""

_MAD_SCALE = 0.6745
"""The standard normal's 0.75 quantile: ``0.6745 * (x - median) / MAD`` is a z-score for normal data."""

_MEAN_AD_SCALE = 1.253314
"""sqrt(pi / 2): the mean absolute deviation times this estimates a normal's standard deviation."""


@dataclass(frozen=True)
class RunValues:
    """One run's values of one metric (None where it logged no finite value)."""

    best: float | None
    best_step: int | None
    final: float | None
    final_step: int | None


@dataclass(frozen=True)
class Spread:
    """Values across runs: their mean, sample standard deviation (ddof=1; NaN for one value)
    and count (runs with a value)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        array = np.asarray(values, dtype=np.float64)
        return cls(float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else float("nan"), len(array))


@dataclass(frozen=True)
class GroupSummary:
    """One metric over one group of runs.

    Attributes:
        key: the group's tag value (None: all runs, or the runs without the tag).
        runs: labels of the group's runs.
        best, final: the spread of the runs' best and final values (None: no values).
        robust_z: each run's robust z-score of its best value (empty with fewer than 3 runs).
        outliers: labels of the runs whose ``|robust_z|`` exceeds :data:`OUTLIER_Z`.
    """

    key: object
    runs: tuple[str, ...]
    best: Spread | None
    final: Spread | None
    robust_z: dict
    outliers: tuple[str, ...]


@dataclass(frozen=True)
class MetricSummary:
    """One metric across runs: ``direction`` (+1 higher is better, -1 lower, 0 not judged:
    no best), each run's :class:`RunValues` by label, and a :class:`GroupSummary` per group."""

    name: str
    direction: int
    runs: dict
    groups: tuple[GroupSummary, ...]


@dataclass(frozen=True)
class GapSummary:
    """A generalisation gap (``train - validation``, final values): each run's by label (runs
    without both metrics left out), and its spread per group as ``(key, labels, Spread)``."""

    train: str
    validation: str
    runs: dict
    groups: tuple[tuple[object, tuple[str, ...], Spread | None], ...]


def run_values(compared: ComparedRun, name: str, sign: int) -> RunValues:
    """Best (by ``sign``: +1 max, -1 min, 0 none) and final finite value of metric ``name``."""
    values, steps, _ = compared.run.history(name)
    finite = np.isfinite(values)
    if not finite.any():
        return RunValues(None, None, None, None)
    values, steps = values[finite], steps[finite]
    best = best_step = None
    if sign:
        at = int(np.argmax(values) if sign > 0 else np.argmin(values))
        best, best_step = float(values[at]), int(steps[at])
    return RunValues(best, best_step, float(values[-1]), int(steps[-1]))


def robust_z(values: np.ndarray) -> np.ndarray:
    """The modified z-score ``0.6745 * (x - median) / MAD`` of each value; where the MAD is 0,
    ``(x - median) / (1.2533 * mean absolute deviation)``; 0 for values all equal."""
    median = np.median(values)
    deviation = values - median
    mad = np.median(np.abs(deviation))
    if mad > 0:
        return _MAD_SCALE * deviation / mad
    mean_ad = np.mean(np.abs(deviation))
    return deviation / (_MEAN_AD_SCALE * mean_ad) if mean_ad > 0 else np.zeros_like(values)


def left_out_z(values: np.ndarray) -> np.ndarray:
    """Each value's distance to the mean of the others, in their standard deviations (ddof=1;
    ``inf`` where the others all agree and the value does not; needs 3 values or more)."""
    z = np.empty(len(values))
    for i in range(len(values)):
        others = np.delete(values, i)
        deviation, scale = values[i] - others.mean(), others.std(ddof=1)
        z[i] = deviation / scale if scale > 0 else (0.0 if deviation == 0 else np.copysign(np.inf, deviation))
    return z


def summarise_metric(name: str, runs: list[ComparedRun], groups) -> MetricSummary:
    """:class:`MetricSummary` of metric ``name`` over ``runs`` (those that logged it), grouped as ``groups``."""
    sign = direction(name)
    values = {r.label: run_values(r, name, sign) for r in runs if name in metric_names(r)}
    summaries = []
    for key, members in groups:
        labels = tuple(r.label for r in members if r.label in values)
        best = [(label, values[label].best) for label in labels if values[label].best is not None]
        z, outliers = {}, ()
        if sign and len(best) >= MIN_RUNS_FOR_OUTLIERS:
            array = np.array([v for _, v in best])
            scores = robust_z(array)
            z = {label: float(s) for (label, _), s in zip(best, scores, strict=True)}
            far = np.abs(array - np.median(array)) > OUTLIER_MIN_RELATIVE * abs(np.median(array))
            far &= np.abs(left_out_z(array)) > OUTLIER_Z
            outliers = tuple(
                label for (label, s), off in zip(z.items(), far, strict=True) if abs(s) > OUTLIER_Z and off
            )
        finals = [values[label].final for label in labels if values[label].final is not None]
        summaries.append(GroupSummary(key, labels, Spread.of([v for _, v in best]), Spread.of(finals), z, outliers))
    return MetricSummary(name, sign, values, tuple(summaries))


def summarise(runs: list[ComparedRun], groups) -> tuple[tuple[MetricSummary, ...], tuple[GapSummary, ...]]:
    """Every metric's :class:`MetricSummary` (in the order first seen across the runs) and every
    generalisation gap's :class:`GapSummary`."""
    names: dict[str, None] = {}
    for compared in runs:
        names.update(dict.fromkeys(metric_names(compared)))
    metrics = tuple(summarise_metric(name, runs, groups) for name in names)
    by_name = {m.name: m for m in metrics}
    gaps = []
    for validation in names:
        pairs = {r.label: training_counterpart(validation, metric_names(r)) for r in runs}
        trains = [t for t in pairs.values() if t is not None]
        if not trains or validation not in by_name:
            continue
        train = max(set(trains), key=trains.count)  # the counterpart most runs have
        gap = {}
        for label, paired in pairs.items():
            held_val, held_train = by_name[validation].runs.get(label), by_name[train].runs.get(label)
            if paired == train and held_val and held_train and None not in (held_val.final, held_train.final):
                gap[label] = held_train.final - held_val.final
        spreads = tuple(
            (key, labels, Spread.of([gap[label] for label in labels]))
            for key, members in groups
            for labels in [tuple(r.label for r in members if r.label in gap)]
        )
        gaps.append(GapSummary(train, validation, gap, spreads))
    return metrics, tuple(gaps)
