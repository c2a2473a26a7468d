"""``dead``: layers whose gradient is almost entirely exact zeros, step after step.

Only steps in which a layer had a gradient count: a layer that took no part in a step (an
expert no token was routed to) is absent then, not zero, in both modes; experts that go
without gradient for long are ``expert_starvation``'s.
"""

from __future__ import annotations

import numpy as np

from gradscope.health.checks.number_format import flushed_rows
from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, for_steps, trailing_run

SPARSE_BY_DESIGN = ("Embedding", "EmbeddingBag")
"""Module types whose gradients are mostly zero in healthy training (rows of unused tokens)."""


def detect(view: RunView, t: Thresholds) -> list[Finding]:
    if len(view.sampled_steps) == 0:
        return []
    judged = np.array([kind not in SPARSE_BY_DESIGN for kind in view.row_types])
    judged[flushed_rows(view, t)[0]] = False  # zeros a low-precision format flushed: underflow, not dead units
    with np.errstate(invalid="ignore"):
        run, start = trailing_run(view.zero_frac >= t.dead_zero_frac, view.present)
    findings = []
    steps = view.sampled_steps
    for r in np.flatnonzero((run >= t.sustain) & judged):
        last = int(np.flatnonzero(view.present[:, r])[-1])
        frac = float(view.zero_frac[last, r])
        findings.append(
            Finding(
                kind="dead",
                severity="warning",
                layer=view.rows[r],
                step=int(steps[last]),
                since_step=int(steps[start[r]]),
                message=(
                    f"{100 * frac:.1f}% of the gradient of '{view.rows[r]}' is exactly zero, "
                    f"{for_steps(int(run[r]), int(start[r]))}"
                ),
                suggestion=SUGGESTIONS["dead"],
                evidence={"zero_frac": frac, "threshold": t.dead_zero_frac, "numel": int(view.numel[last, r])},
            )
        )
    return findings
