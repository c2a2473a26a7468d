"""The per-layer comparison: the same layer's gradient norm in every run, side by side.

For each layer all runs have, and each run: the final norm (at the run's last kept sampled
step where the layer had a gradient), the median norm over the kept sampled steps, and that
median's ratio to the first run's (the reference): one number per layer and run that stays
readable for hundreds of layers. ``norms`` adds the norm at up to :data:`MAX_STEPS` sampled
steps all runs share (evenly spread, the last included), for plots and JSON.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from gradscope.comparison.runs import ComparedRun

STATISTIC = "norm"
"""The per-layer statistic compared: the gradient's L2 norm (:mod:`gradscope.stats.layout`)."""

MAX_STEPS = 50
"""Shared sampled steps whose norms :class:`LayerTable` keeps (evenly spread over the runs)."""


@dataclass(frozen=True)
class LayerTable:
    """The per-layer comparison (module docstring).

    Attributes:
        rows: the layers compared (those every run has, in the first run's order).
        runs: run labels, the reference first.
        final: float64 ``(runs, rows)``, each layer's last norm per run (NaN: never present).
        median: float64 ``(runs, rows)``, its median norm over the run's kept sampled steps.
        ratio: float64 ``(runs, rows)``, ``median / median of the reference run`` (1 for the
            reference; NaN where either is missing or the reference's is 0).
        steps: int64 ``(S,)``, shared sampled steps, at most :data:`MAX_STEPS`.
        norms: float64 ``(runs, S, rows)``, the norm at those steps (NaN where absent).
    """

    rows: tuple[str, ...]
    runs: tuple[str, ...]
    final: np.ndarray
    median: np.ndarray
    ratio: np.ndarray
    steps: np.ndarray
    norms: np.ndarray


def shared_steps(all_steps: list[np.ndarray], most: int) -> np.ndarray:
    """The steps in every array of ``all_steps``, thinned to at most ``most``, evenly spread, last kept."""
    shared = all_steps[0]
    for steps in all_steps[1:]:
        shared = np.intersect1d(shared, steps)
    if len(shared) > most:
        shared = shared[np.unique(np.round(np.linspace(0, len(shared) - 1, most)).astype(np.int64))]
    return shared.astype(np.int64)


def layer_table(runs: list[ComparedRun], rows: tuple[str, ...]) -> LayerTable:
    """:class:`LayerTable` of ``runs`` over the layers ``rows`` (all of them in every run)."""
    series = []
    for compared in runs:
        values, steps, names = compared.run.history(STATISTIC)
        where = {name: i for i, name in enumerate(names)}
        series.append((np.asarray(values)[:, [where[row] for row in rows]].reshape(len(steps), len(rows)), steps))
    final = np.full((len(runs), len(rows)), np.nan)
    median = np.full((len(runs), len(rows)), np.nan)
    for r, (values, _) in enumerate(series):
        seen = np.isfinite(values)
        if len(values):
            last = len(values) - 1 - np.argmax(seen[::-1], axis=0)
            final[r] = np.where(seen.any(axis=0), values[last, np.arange(len(rows))], np.nan)
            with warnings.catch_warnings():  # a layer never present: NaN, as documented
                warnings.simplefilter("ignore", RuntimeWarning)
                median[r] = np.nanmedian(values, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(median[:1] > 0, median / median[:1], np.nan)
    steps = shared_steps([s for _, s in series], MAX_STEPS)
    norms = np.stack([values[np.searchsorted(s, steps)] for values, s in series]) if len(steps) else None
    if norms is None:
        norms = np.zeros((len(runs), 0, len(rows)))
    return LayerTable(rows, tuple(r.label for r in runs), final, median, ratio, steps, norms)
