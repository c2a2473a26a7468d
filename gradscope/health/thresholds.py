"""``Thresholds``: every number behind a health verdict, named, documented, validated.

Defaults are chosen to be quiet on healthy training (a well-initialised MLP or Transformer
trained with Adam or SGD and a mean-reduced loss) and loud on clear failures; tune them with
``watch(..., thresholds=Thresholds(...))`` or ``mon.report(thresholds=...)``. Gradient
magnitudes are root-mean-square values of the elements (``rms``), after GradScaler unscaling.
Counts of "sampled steps" refer to steps the monitor measured (``every``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Thresholds:
    """Thresholds of the health checks (see :mod:`gradscope.health`).

    Attributes:
        sustain: sampled steps in a row a vanishing/dead/exploding-ceiling/update condition
            must hold before it is a finding (one bad step is not a finding).
        explode_rms: exploding: a layer's gradient rms above this ceiling.
        spike_factor: exploding: the total gradient norm above this many times its running
            median over the previous ``spike_window`` sampled steps (a spike), and above the
            run's initial total norm (the largest of its first ``smooth`` sampled steps) divided by
            this factor (a converged run's ordinary batch is not a spike).
        spike_window: sampled steps in that running median; spikes are reported while they
            are among the last ``spike_window`` sampled steps.
        trend_window: exploding: sampled steps over which a sustained rise is looked for.
        trend_growth: exploding: rise of the total norm over ``trend_window`` (a steady fit
            on a log scale) that counts as a sustained upward trend.
        vanish_rms: vanishing: a layer's rms over its non-zero elements below this floor.
        vanish_ratio: vanishing: a layer's rms (non-zero elements) below this fraction of the
            largest layer's rms at the same step (gradient flow collapsing).
        dead_zero_frac: dead: fraction of a layer's gradient that is exactly zero at or above
            this (embedding layers, sparse by design, are not judged).
        underflow_fraction: underflow: fraction of a float16 tensor's finite non-zero values below
            float16's smallest normal (``2**-14``) at or above which its values are underflowing.
        fp8_flush_fraction: fp8_range: fraction of a layer's finite non-zero gradient values that
            FP8 (E5M2, per-tensor amax scaling) would flush to zero, at or above which it is an
            (``info``) finding.
        update_ratio_low: stalled_updates: ``||update|| / ||weight||`` below this (learning
            rate too low; ~1e-3 is usual).
        update_ratio_high: stalled_updates: the ratio above this (learning rate too high).
        overflow_window: steps over which GradScaler skips are counted.
        overflow_warn_fraction: skipped fraction of ``overflow_window`` that turns the
            ``overflow`` finding from info into a warning.
        plateau_patience: plateau: steps without improvement of the training loss (or other
            per-step metric) beyond ``plateau_tolerance``.
        plateau_evals: plateau: evaluations without improvement, for metrics logged with
            ``mon.log`` (validation metrics).
        plateau_tolerance: relative improvement that counts as progress.
        smooth: per-step losses (and other per-step metrics) are smoothed by a trailing mean
            over this many steps before plateaus, divergence and underfitting are judged; the
            mean of the run's first ``smooth`` finite losses is where underfitting is measured from.
        divergence_window: divergence: steps over which a steady rise of the loss is looked for.
        divergence_rise: divergence: relative rise of the smoothed loss above its best that,
            steady over ``divergence_window``, counts as divergence.
        overfit_evals: overfitting: evaluations over which the validation loss rises while
            the training loss falls.
        overfit_gap: overfitting: the training value of a higher-is-better metric (accuracy,
            f1...) above its validation value by more than this (in the metric's own units).
            Lower-is-better metrics (losses) are judged by ``overfit_evals`` instead.
        underfit_steps: underfitting: steps after which a training loss that has not dropped
            is a finding.
        underfit_min_drop: underfitting: relative drop of the smoothed loss from its start
            below which the model counts as not learning.
    """

    sustain: int = 5
    explode_rms: float = 10.0
    spike_factor: float = 10.0
    spike_window: int = 50
    trend_window: int = 30
    trend_growth: float = 100.0
    vanish_rms: float = 1e-9
    vanish_ratio: float = 1e-5
    dead_zero_frac: float = 0.99
    underflow_fraction: float = 0.5
    fp8_flush_fraction: float = 0.05
    update_ratio_low: float = 1e-7
    update_ratio_high: float = 0.1
    overflow_window: int = 100
    overflow_warn_fraction: float = 0.2
    plateau_patience: int = 200
    plateau_evals: int = 5
    plateau_tolerance: float = 1e-3
    smooth: int = 9
    divergence_window: int = 50
    divergence_rise: float = 0.5
    overfit_evals: int = 3
    overfit_gap: float = 0.15
    underfit_steps: int = 300
    underfit_min_drop: float = 0.02

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"Thresholds.{spec.name} must be a positive integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Thresholds.{spec.name} must be a positive number, got {value!r}")
        for name in (
            "dead_zero_frac",
            "underflow_fraction",
            "fp8_flush_fraction",
            "overflow_warn_fraction",
            "underfit_min_drop",
            "plateau_tolerance",
        ):
            if getattr(self, name) > 1:
                raise ValueError(f"Thresholds.{name} is a fraction and must be at most 1, got {getattr(self, name)!r}")
        if self.spike_factor <= 1 or self.trend_growth <= 1:
            raise ValueError("Thresholds.spike_factor and trend_growth must be greater than 1")
        if self.update_ratio_low >= self.update_ratio_high:
            raise ValueError("Thresholds.update_ratio_low must be below update_ratio_high")
        if self.trend_window < 3 or self.divergence_window < 3:
            raise ValueError("Thresholds.trend_window and divergence_window must be at least 3")
