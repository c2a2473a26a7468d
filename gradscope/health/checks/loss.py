"""Checks on the loss and logged metrics: ``plateau``, ``divergence``, ``overfitting``,
``underfitting``.

Metric names decide direction: names containing ``accuracy``, ``f1``, ``recall`` or
``precision`` are higher-is-better, ``loss`` or ``error`` lower-is-better; other metrics are
kept and plotted but not judged. Validation metrics are those named ``val_*``, ``valid_*``,
``validation_*``, ``eval_*`` or ``test_*``; their training counterpart is ``train_<name>``
or ``<name>`` (``val_loss`` pairs with the per-step training ``loss``). Per-step series are
smoothed with a trailing mean of ``Thresholds.smooth`` steps before they are judged.
"""

from __future__ import annotations

import numpy as np

from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.progress import progress_of
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, moving_average, steady_rise

HIGHER_IS_BETTER = ("accuracy", "f1", "recall", "precision")
LOWER_IS_BETTER = ("loss", "error")
VALIDATION_PREFIXES = ("val_", "valid_", "validation_", "eval_", "test_")


def direction(name: str) -> int:
    """+1 if higher is better, -1 if lower is better, 0 if the metric is not judged."""
    lowered = name.lower()
    if any(word in lowered for word in HIGHER_IS_BETTER):
        return 1
    if any(word in lowered for word in LOWER_IS_BETTER):
        return -1
    return 0


def _validation_base(name: str) -> str | None:
    for prefix in VALIDATION_PREFIXES:
        if name.lower().startswith(prefix):
            return name[len(prefix) :]
    return None


def training_counterpart(name: str, names) -> str | None:
    """The training metric among ``names`` that validation metric ``name`` pairs with
    (``val_loss`` -> ``train_loss``, else ``loss``; ``val_acc`` -> ``train_acc``, else ``acc``),
    or None: ``name`` is not a validation metric, or none of its counterparts was logged."""
    base = _validation_base(name)
    if base is None:
        return None
    return next((train for train in (f"train_{base}", base) if train in names), None)


def detect(view: RunView, t: Thresholds) -> list[Finding]:
    findings = []
    series = {"loss": (view.steps, view.loss), **view.metrics}
    dense = {name for name, (steps, _) in series.items() if len(steps) > 0.5 * max(len(view.steps), 1)}
    smoothed = {
        name: moving_average(values, t.smooth) if name in dense else values for name, (_, values) in series.items()
    }
    for name, (steps, _) in series.items():
        sign = direction(name)
        if sign == 0 or len(steps) == 0:
            continue
        patience = t.plateau_patience if name in dense else t.plateau_evals
        findings += _plateau(name, steps, smoothed[name], sign, patience, name in dense, t)
    if len(view.steps):
        findings += _divergence(view.steps, smoothed["loss"], t)
        findings += _underfitting(view, smoothed["loss"], t)
    for name, (steps, values) in view.metrics.items():
        train_name = training_counterpart(name, series)
        if train_name is None or direction(train_name) == 0:
            continue
        train_steps, _ = series[train_name]
        findings += _overfitting(name, steps, values, train_name, train_steps, smoothed[train_name], direction(name), t)
    return findings


def divergence(view: RunView, t: Thresholds) -> list[Finding]:
    """The divergence rule alone, on the smoothed training loss (the learning-rate controller
    applies it with its own, more sensitive, rise and window)."""
    if not len(view.steps):
        return []
    return _divergence(view.steps, moving_average(view.loss, t.smooth), t)


def _plateau(name, steps, values, sign, patience, dense, t) -> list[Finding]:
    ok = np.isfinite(values)
    steps, values = steps[ok], values[ok]
    if len(values) <= patience:
        return []
    # "Improved" is the rule early stopping uses too (gradscope.health.progress).
    last = progress_of(values, sign, tolerance=t.plateau_tolerance).last_improved
    waited = len(values) - 1 - last
    if waited < patience:
        return []
    v = -sign * values  # lower is better from here on
    # The best step: the first to come within the tolerance of the best value (where the
    # plateau began, and where early stopping would have stopped).
    lowest = float(v.min())
    best = int(np.flatnonzero(v <= lowest + t.plateau_tolerance * abs(lowest))[0])
    unit = "steps" if dense else "evaluations"
    best_value = float(-sign * lowest)
    return [
        Finding(
            kind="plateau",
            severity="info",
            layer=None,
            step=int(steps[-1]),
            since_step=int(steps[last]),
            message=(
                f"{name} has not improved by more than {100 * t.plateau_tolerance:g}% for {waited} {unit}; "
                f"best {best_value:.4g} at step {int(steps[best])}"
            ),
            suggestion=SUGGESTIONS["plateau"],
            evidence={
                "metric": name,
                "best_step": int(steps[best]),
                "best_value": best_value,
                "waited": waited,
                "patience": patience,
            },
        )
    ]


def _divergence(steps, smooth, t) -> list[Finding]:
    ok = np.isfinite(smooth)
    steps, v = steps[ok], smooth[ok]
    if len(v) < t.divergence_window:
        return []
    best_at = int(np.argmin(v))
    best, last = float(v[best_at]), float(v[-1])
    scale = abs(best) or abs(last) or 1.0  # a best loss of exactly 0 has no relative scale
    slope, correlation = steady_rise(v[-t.divergence_window :])
    threshold = best + t.divergence_rise * scale
    if last > threshold and slope > 0 and correlation >= 0.8:
        message = (
            f"the loss is rising steadily: {last:.4g} now, {100 * (last - best) / scale:.0f}% above its "
            f"best {best:.4g} at step {int(steps[best_at])}"
        )
        pattern = "rising"
    elif best_at < len(v) - t.divergence_window and np.all(v[-t.divergence_window :] > threshold):
        # A jump that stays: the loss left its best and has not come back for a whole window.
        jumped = best_at + int(np.argmax(v[best_at:] > threshold))
        message = (
            f"the loss jumped at step {int(steps[jumped])} and has stayed up: {last:.4g} now, "
            f"{100 * (last - best) / scale:.0f}% above its best {best:.4g} at step {int(steps[best_at])}"
        )
        pattern = "jump"
    else:
        return []
    return [
        Finding(
            kind="divergence",
            severity="critical",
            layer=None,
            step=int(steps[-1]),
            since_step=int(steps[best_at]),
            message=message,
            suggestion=SUGGESTIONS["divergence"],
            evidence={"loss": last, "best": best, "best_step": int(steps[best_at]), "pattern": pattern},
        )
    ]


def _underfitting(view: RunView, smooth, t) -> list[Finding]:
    """The loss has never dropped much below where it started (a model that learned and then
    got worse is diverging, not underfitting)."""
    if view.initial_loss is None or view.steps[-1] + 1 < t.underfit_steps:
        return []
    finite = smooth[np.isfinite(smooth)]
    start = view.initial_loss
    if not len(finite) or start == 0 or not np.isfinite(smooth[-1]):
        return []
    best = float(finite.min())
    drop = (start - best) / abs(start)
    if drop >= t.underfit_min_drop:
        return []
    return [
        Finding(
            kind="underfitting",
            severity="warning",
            layer=None,
            step=int(view.steps[-1]),
            since_step=0,
            message=(
                f"the training loss has dropped at most {100 * drop:.1f}% in {int(view.steps[-1]) + 1} steps "
                f"(from {start:.4g} to {best:.4g} at best): the model is not learning"
            ),
            suggestion=SUGGESTIONS["underfitting"],
            evidence={"initial_loss": start, "loss": float(smooth[-1]), "best": best, "drop": drop},
        )
    ]


def _overfitting(name, steps, values, train_name, train_steps, train_values, sign, t) -> list[Finding]:
    ok = np.isfinite(values)
    steps, values = steps[ok], values[ok]
    if len(values) == 0:
        return []
    at = np.searchsorted(train_steps, steps, side="right") - 1  # latest training value at each evaluation
    valid = at >= 0
    steps, values, train = steps[valid], values[valid], train_values[at[valid]]
    n = t.overfit_evals + 1
    if sign < 0 and len(values) >= n:
        val_rising = np.all(np.diff(values[-n:]) > 0)
        train_falling = np.isfinite(train[-n]) and np.isfinite(train[-1]) and train[-1] < train[-n]
        if val_rising and train_falling:
            best = int(np.argmin(values))
            return [
                Finding(
                    kind="overfitting",
                    severity="warning",
                    layer=None,
                    step=int(steps[-1]),
                    since_step=int(steps[-n]),
                    message=(
                        f"{name} rose for {n - 1} evaluations ({float(values[-n]):.4g} -> "
                        f"{float(values[-1]):.4g}) while {train_name} fell ({float(train[-n]):.4g} -> "
                        f"{float(train[-1]):.4g}); best {name} {float(values[best]):.4g} at step {int(steps[best])}"
                    ),
                    suggestion=SUGGESTIONS["overfitting"],
                    evidence={"metric": name, "train_metric": train_name, "best_step": int(steps[best])},
                )
            ]
    if sign > 0 and len(values) and np.isfinite(train[-1]):
        gap = float(train[-1] - values[-1])
        if gap > t.overfit_gap:
            return [
                Finding(
                    kind="overfitting",
                    severity="warning",
                    layer=None,
                    step=int(steps[-1]),
                    since_step=int(steps[-1]),
                    message=(
                        f"{train_name} {float(train[-1]):.3g} is {gap:.3g} above {name} {float(values[-1]):.3g} "
                        f"(gap threshold {t.overfit_gap:g})"
                    ),
                    suggestion=SUGGESTIONS["overfitting"],
                    evidence={"metric": name, "train_metric": train_name, "gap": gap},
                )
            ]
    return []
