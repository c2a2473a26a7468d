"""``stalled_updates``: optimizer steps far too small, or far too large, for the weights."""

from __future__ import annotations

import numpy as np

from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, layer_list, trailing_run


def detect(view: RunView, t: Thresholds) -> list[Finding]:
    if view.update_ratio is None:
        return []
    tracked = np.isfinite(view.update_ratio).any(axis=1)  # steps whose optimizer step was seen
    ratio = view.update_ratio[tracked]
    weight = view.weight_norm[tracked]
    steps = view.sampled_steps[tracked]
    all_zero = view.zero_frac[tracked] >= 1.0  # no gradient to apply: a dead layer, reported as such
    if len(steps) == 0:
        return []
    findings = []
    with np.errstate(invalid="ignore"):
        judged = weight > 1e-12  # a weight of zero has no meaningful ratio
        cases = (
            (
                "low",
                (ratio < t.update_ratio_low) & judged & ~all_zero,
                "too small: learning rate too low?",
                t.update_ratio_low,
            ),
            ("high", (ratio > t.update_ratio_high) & judged, "too large: learning rate too high?", t.update_ratio_high),
        )
    for side, condition, what, bound in cases:
        run, start = trailing_run(condition, np.isfinite(ratio))
        hit = np.flatnonzero(run >= t.sustain)
        if not hit.size:
            continue
        names = [view.rows[r] for r in hit]
        latest = np.array([ratio[np.flatnonzero(np.isfinite(ratio[:, r]))[-1], r] for r in hit])  # each row's own
        typical = float(np.median(latest))
        findings.append(
            Finding(
                kind="stalled_updates",
                severity="warning",
                layer=names[0],
                step=int(steps[-1]),
                since_step=int(steps[start[hit].max()]),
                message=(
                    f"update/weight ratio {what} in {len(names)} layers ({layer_list(names)}): median {typical:.2e} "
                    f"against the {'lower' if side == 'low' else 'upper'} bound {bound:g} (~1e-3 is usual)"
                ),
                suggestion=SUGGESTIONS[f"stalled_updates_{side}"],
                evidence={"side": side, "bound": bound, "ratio": dict(zip(names, latest.tolist(), strict=True))},
                layers=tuple(names),
            )
        )
    return findings
