"""``rank_desync``: DDP replicas whose gradients differ after the all-reduce.

Every rank of a DDP run must hold bit-identical averaged gradients; when they do not (a
parameter left out of DDP's buckets, rank-dependent gradient code, a ``no_sync`` on the
wrong step), the replicas drift apart silently. ``watch(ddp_model, check_consistency=True)``
compares them at every sampled step (see :mod:`gradscope.distributed.replicas`); the first step where
they disagree is kept for the whole run.
"""

from __future__ import annotations

from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, layer_list


def detect(view: RunView, t: Thresholds) -> list[Finding]:
    if not view.desync_events:
        return []
    first = view.desync_events[0]
    names = [view.rows[r] for r in first.rows]
    ranks = ", ".join(str(r) for r in first.ranks) if first.ranks else "unknown"
    return [
        Finding(
            kind="rank_desync",
            severity="critical",
            layer=names[0] if names else None,
            step=view.desync_events[-1].step,
            since_step=first.step,
            message=(
                f"gradients differ between DDP ranks after the all-reduce, first at step {first.step}: "
                f"rank{'s' if len(first.ranks) != 1 else ''} {ranks} disagree"
                + (" with the majority" if first.ranks and len(first.ranks) * 2 < view.world else "")
                + f" in {len(names)} layer{'s' if len(names) != 1 else ''} ({layer_list(names)}); "
                f"{view.desync_steps} sampled steps affected so far"
            ),
            suggestion=SUGGESTIONS["rank_desync"],
            evidence={
                "first_step": first.step,
                "ranks": list(first.ranks),
                "layers": names,
                "sampled_steps_affected": view.desync_steps,
            },
            layers=tuple(names),
        )
    ]
