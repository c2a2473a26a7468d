"""``fp8_range``: layers whose gradient FP8 would flush to zero in large part (``info``).

From each row's newest histogram and its ``max_abs`` at that step (histograms come on a
cadence, ``watch(histogram_every=)``: the finding's step is the histogram's, and the evidence
gives each layer's; :func:`gradscope.stats.formats.fp8_fields`):
the fraction of its finite non-zero gradient values that a cast to E5M2 (the usual FP8
gradient format) with per-tensor power-of-two amax scaling would round to zero; the E4M3
figures are in the evidence. The run is not in FP8, so this is advice for a move to FP8,
not a fault: severity ``info``, which leaves a healthy run healthy.
"""

from __future__ import annotations

import numpy as np

from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, layer_list
from gradscope.stats import formats


def detect(view: RunView, t: Thresholds) -> list[Finding]:
    if view.latest_hist is None or len(view.sampled_steps) == 0:
        return []
    fields = formats.fp8_fields(view.latest_hist, view.latest_hist_max_abs)
    lost = fields["fp8_e5m2_zero"]
    with np.errstate(invalid="ignore"):
        rows = np.flatnonzero(lost >= t.fp8_flush_fraction)
    if not len(rows):
        return []
    rows = rows[np.lexsort((rows, -lost[rows]))]  # most affected first
    names = [view.rows[r] for r in rows]
    worst = rows[0]
    step = int(view.latest_hist_step[worst])
    return [
        Finding(
            kind="fp8_range",
            severity="info",
            layer=names[0],
            step=step,
            since_step=step,
            message=(
                f"in FP8 E5M2 (per-tensor amax scaling) {100 * lost[worst]:.0f}% of the non-zero gradient values of "
                f"'{names[0]}' would be flushed to zero (E4M3: {100 * fields['fp8_e4m3_zero'][worst]:.0f}%)"
                + (f"; also {layer_list(names[1:])}" if len(names) > 1 else "")
            ),
            suggestion=SUGGESTIONS["fp8_range"],
            evidence={
                **{name: {view.rows[r]: float(fields[name][r]) for r in rows} for name in formats.FP8_FIELDS},
                "hist_step": {view.rows[r]: int(view.latest_hist_step[r]) for r in rows},
            },
            layers=tuple(names),
        )
    ]
