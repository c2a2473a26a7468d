"""``exploding``: a layer above the rms ceiling, a spike of the total norm, or a steady rise."""

from __future__ import annotations

import warnings

import numpy as np

from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, for_steps, layer_list, steady_rise, trailing_run


def detect(view: RunView, t: Thresholds) -> list[Finding]:
    findings = []
    steps = view.sampled_steps
    if len(steps) == 0:
        return findings
    rms = view.rms
    with np.errstate(invalid="ignore"):
        run, start = trailing_run(rms > t.explode_rms, view.present)
    above = np.flatnonzero(run >= t.sustain)
    if above.size:
        latest_index = [int(np.flatnonzero(view.present[:, r])[-1]) for r in above]
        latest = rms[latest_index, above]
        worst = above[np.argmax(latest)]
        names = [view.rows[r] for r in above[np.argsort(-latest)]]
        # Gradients flow from the loss toward the input: the first of these layers in backward
        # order is where the gradient first rises above the ceiling (e.g. a faulty custom op).
        origin = None
        if view.backward_order is not None:
            order = view.backward_order[latest_index, above]
            if np.all(order >= 0):
                origin = above[np.argmin(order)]
        where = f"largest {float(latest.max()):.3g} in '{view.rows[worst]}'"
        if origin is not None and len(above) > 1:
            where = f"first in backward order (nearest the loss) '{view.rows[origin]}'; " + where
        findings.append(
            Finding(
                kind="exploding",
                severity="warning",
                layer=view.rows[worst if origin is None else origin],
                step=int(steps[-1]),
                since_step=int(steps[start[worst]]),
                message=(
                    f"gradient rms above {t.explode_rms:g} {for_steps(int(run[worst]), int(start[worst]))} in "
                    f"{len(names)} layers ({layer_list(names)}); {where}"
                ),
                suggestion=SUGGESTIONS["exploding"],
                evidence={
                    "ceiling": t.explode_rms,
                    "rms": dict(zip([view.rows[r] for r in above], latest.tolist(), strict=True)),
                    "largest": view.rows[worst],
                    "first_in_backward_order": None if origin is None else view.rows[origin],
                },
                layers=tuple(names),
            )
        )

    total = view.total_norm
    # A spike that stays far below the gradients the run started with is a converged run's
    # ordinary batch, not an explosion (relative to a tiny median, anything looks large).
    floor = view.initial_grad_norm / t.spike_factor if view.initial_grad_norm else 0.0
    spikes = _spikes(total, t.spike_window, t.spike_factor, floor)
    if spikes:
        i, median = spikes[-1]
        findings.append(
            Finding(
                kind="exploding",
                severity="warning",
                layer=None,
                step=int(steps[i]),
                since_step=int(steps[spikes[0][0]]),
                message=(
                    f"total gradient norm spiked to {float(total[i]):.3g} at step {int(steps[i])}, "
                    f"{float(total[i]) / median:.0f}x its running median ({median:.3g}); {len(spikes)} spikes recently"
                ),
                suggestion=SUGGESTIONS["exploding"],
                evidence={
                    "norm": float(total[i]),
                    "running_median": median,
                    "spike_steps": [int(steps[j]) for j, _ in spikes],
                },
            )
        )

    if len(total) >= t.trend_window:
        window = total[-t.trend_window :]
        with np.errstate(divide="ignore"):
            slope, correlation = steady_rise(np.log10(window))
        rise = slope * (t.trend_window - 1)
        if rise >= np.log10(t.trend_growth) and correlation >= 0.9:
            findings.append(
                Finding(
                    kind="exploding",
                    severity="warning",
                    layer=None,
                    step=int(steps[-1]),
                    since_step=int(steps[-t.trend_window]),
                    message=(
                        f"total gradient norm rose steadily {10**rise:.0f}x over the last {t.trend_window} "
                        f"sampled steps (now {float(total[-1]):.3g})"
                    ),
                    suggestion=SUGGESTIONS["exploding"],
                    evidence={"growth": float(10**rise), "correlation": correlation, "window": t.trend_window},
                )
            )
    return findings


def _spikes(total: np.ndarray, window: int, factor: float, floor: float) -> list[tuple[int, float]]:
    """``(index, running median)`` of each of the last ``window`` sampled steps whose total norm
    is above ``factor`` times the median of the (up to) ``window`` finite positive norms before
    it (at least 5 of them) and above ``floor``: one vectorised pass (a judgement's cost)."""
    indices = np.arange(max(1, len(total) - window), len(total))
    if not len(indices):
        return []
    usable = np.where(np.isfinite(total) & (total > 0), total, np.nan)
    padded = np.concatenate([np.full(window, np.nan), usable])
    previous = np.lib.stride_tricks.sliding_window_view(padded, window)[indices]  # row j: total[i-window:i]
    counts = np.count_nonzero(~np.isnan(previous), axis=1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: their median is NaN
        medians = np.nanmedian(previous, axis=1)
        hits = (counts >= 5) & (total[indices] > np.maximum(factor * medians, floor))
    return [(int(i), float(m)) for i, m in zip(indices[hits], medians[hits], strict=True)]
