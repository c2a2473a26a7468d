"""``expert_starvation``: experts of a mixture of experts that receive no gradient, step after step.

A router sends each token to a few experts. An expert no token reaches takes no part in the
step: its rows are absent (no gradient, which is not a zero gradient: it is not ``dead``).
Some experts go unused in a step by chance; one that gets nothing for ``sustain`` sampled
steps while its siblings do is starved, and many starved experts are a collapsed router (it
sends everything to a few favourites, and the others never learn).

Experts are recognised structurally (:mod:`gradscope.monitor.siblings`, recorded with the
run): at least :data:`MIN_EXPERTS` sibling modules of one container with identical trainable
parameters. An expert receives a gradient in a step when any of its rows is present; steps
in which the whole group received none (a failed step, a skipped block) neither break nor
extend a starvation.
"""

from __future__ import annotations

import numpy as np

from gradscope.health.findings import SUGGESTIONS, Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, for_steps, layer_list, trailing_run

MIN_EXPERTS = 4
"""Identical siblings a group needs to be read as the experts of a mixture of experts. Two or
three are ordinary architecture (towers, heads); routers in use choose among 8 or more
(Switch Transformers, Mixtral: 8; DeepSeek, Qwen MoE: 60+). A stack of identical blocks also
qualifies, and a block that gets no gradient while the others do is worth the same report."""


def detect(view: RunView, t: Thresholds) -> list[Finding]:
    if len(view.sampled_steps) == 0:
        return []
    steps = view.sampled_steps
    findings = []
    for group in view.sibling_groups:
        if len(group.members) < MIN_EXPERTS:
            continue
        received = np.stack([view.present[:, rows].any(axis=1) for rows in group.rows], axis=1)  # (S, E)
        counted = np.broadcast_to(received.any(axis=1, keepdims=True), received.shape)  # the group took part
        run, start = trailing_run(~received, counted)
        starved = np.flatnonzero(run >= t.sustain)
        if not starved.size:
            continue
        shortest = int(run[starved].min())  # every named expert got nothing in the group's last `shortest` steps
        since = int(start[starved].max())
        names = [group.members[e] for e in starved]
        fraction = len(starved) / len(group.members)
        last = int(np.flatnonzero(counted[:, 0])[-1])
        findings.append(
            Finding(
                kind="expert_starvation",
                severity="warning",
                layer=group.name,
                step=int(steps[last]),
                since_step=int(steps[since]),
                message=(
                    f"{len(starved)} of {len(group.members)} experts of '{group.name}' ({100 * fraction:.0f}%) "
                    f"received no gradient while the others did, {for_steps(shortest, since)}: {layer_list(names)}"
                ),
                suggestion=SUGGESTIONS["expert_starvation"],
                evidence={
                    "experts": names,
                    "starved": len(starved),
                    "group_size": len(group.members),
                    "fraction": fraction,
                    "sampled_steps": shortest,
                },
            )
        )
    return findings
