"""``nonfinite`` (NaN/Inf in a gradient or the loss) and ``overflow`` (GradScaler skips)."""

from __future__ import annotations

import numpy as np

from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, layer_list


def _ranks(event) -> str:
    if event.rank < 0:
        return ""
    others = event.ranks - 1
    return f"; on rank {event.rank}" + (f" and {others} more rank{'s' if others > 1 else ''}" if others > 0 else "")


def detect(view: RunView, t: Thresholds) -> list[Finding]:
    findings = []
    skipped = set(view.steps[view.skipped].tolist())
    # Steps a GradScaler skipped had overflowing *scaled* gradients: that is its normal
    # operation (reported as overflow below), not a non-finite gradient.
    events = [e for e in view.nonfinite_events if e.step not in skipped]
    if events:
        first = events[0]
        names = [view.rows[r] for r in first.rows]
        where = "nearest the loss in backward order" if first.backward_order_known else "last in model order"
        findings.append(
            Finding(
                kind="nonfinite",
                severity="critical",
                layer=names[0],
                step=first.step,
                since_step=first.step,
                message=(
                    f"NaN/Inf gradients first at step {first.step}: first in layer '{names[0]}' ({where})"
                    + (
                        f", followed by {len(names) - 1} more layers ({layer_list(names[1:])})"
                        if len(names) > 1
                        else ""
                    )
                    + f"; {first.nans} NaN and {first.infs} Inf values at that step"
                    + _ranks(first)
                ),
                suggestion=SUGGESTIONS["nonfinite"],
                evidence={
                    "first_step": first.step,
                    "layers": names,
                    "nans": first.nans,
                    "infs": first.infs,
                    "order": "backward" if first.backward_order_known else "model",
                    "sampled_steps_affected": view.nonfinite_steps - len(view.nonfinite_events) + len(events),
                    **({"rank": first.rank, "ranks_affected": first.ranks} if first.rank >= 0 else {}),
                },
                layers=tuple(names),
            )
        )
    if view.first_bad_loss is not None:
        step, value = view.first_bad_loss
        findings.append(
            Finding(
                kind="nonfinite",
                severity="critical",
                layer=None,
                step=step,
                since_step=step,
                message=f"the loss is {value} at step {step}",
                suggestion=SUGGESTIONS["nonfinite"],
                evidence={"step": step, "loss": str(value)},
            )
        )
    if skipped:
        ordered = sorted(skipped)
        recent = view.steps[-t.overflow_window :]
        fraction = float(np.isin(recent, ordered).mean()) if len(recent) else 0.0
        severity = "warning" if fraction >= t.overflow_warn_fraction else "info"
        findings.append(
            Finding(
                kind="overflow",
                severity=severity,
                layer=None,
                step=ordered[-1],
                since_step=ordered[0],
                message=(
                    f"the GradScaler skipped {len(ordered)} steps for overflowing gradients "
                    f"({100 * fraction:.0f}% of the last {len(recent)} steps), the last at step {ordered[-1]}"
                ),
                suggestion=SUGGESTIONS["overflow"],
                evidence={"skipped_steps": ordered[-50:], "recent_fraction": fraction},
            )
        )
    return findings
