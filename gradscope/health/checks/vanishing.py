"""``vanishing``: layers whose gradients are tiny, absolutely or next to the largest layer."""

from __future__ import annotations

import numpy as np

from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, for_steps, layer_list, trailing_run


def detect(view: RunView, t: Thresholds) -> list[Finding]:
    if len(view.sampled_steps) == 0:
        return []
    rms = view.rms_nonzero  # sparse gradients are judged by the values they do have
    # The reference is the largest layer that is not itself exploding: a layer is not
    # vanishing merely because another one explodes.
    usable = np.isfinite(rms) & (rms <= t.explode_rms)
    largest = np.max(np.where(usable, rms, 0.0), axis=1, initial=0.0)
    with np.errstate(invalid="ignore"):
        small = (rms < t.vanish_rms) | (rms < t.vanish_ratio * largest[:, None])
    run, start = trailing_run(small, view.present)
    hit = np.flatnonzero(run >= t.sustain)
    if not hit.size:
        return []
    last = [int(np.flatnonzero(view.present[:, r])[-1]) for r in hit]  # each row's latest present step
    latest = rms[last, hit]
    reference = float(largest[max(last)])
    worst = hit[np.argmin(latest)]
    names = [view.rows[r] for r in hit]
    steps = view.sampled_steps
    return [
        Finding(
            kind="vanishing",
            severity="warning",
            layer=view.rows[worst],
            step=int(steps[-1]),
            since_step=int(steps[start[hit].max()]),
            message=(
                f"gradients vanish in {len(names)} layers ({layer_list(names)}) "
                f"{for_steps(int(run[hit].min()), int(start[hit].max()))}: rms {float(latest.min()):.2e} in "
                f"'{view.rows[worst]}' against {reference:.2e} in the largest layer"
            ),
            suggestion=SUGGESTIONS["vanishing"],
            evidence={
                "floor": t.vanish_rms,
                "ratio": t.vanish_ratio,
                "largest_rms": reference,
                "rms": dict(zip(names, latest.tolist(), strict=True)),
            },
            layers=tuple(names),
        )
    ]
