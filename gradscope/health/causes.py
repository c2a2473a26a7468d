"""Causes: which findings are consequences of an earlier one, and the order that shows it.

One fault often raises several findings: a NaN gradient goes into the weights, the loss
jumps, and the layers after the poisoned ones stop receiving gradient. :func:`link` sets
each consequence's ``cause`` to the finding that explains it and orders the findings so
that each root cause comes first, followed by what it caused. The rules are declared once,
in :data:`RULES`; each says why its cause explains its effects.

A cause is ``{"kind", "layer", "step"}``: the root finding's kind, layer and ``since_step``.
One cause is not a finding: ``lr_increase`` (``layer`` None, ``step`` the step at which a
logged learning rate at least doubled), an event read from the logged metrics that explains
an exploding gradient; the exploding finding then still heads its own group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import NamedTuple

import numpy as np

from gradscope.health.findings import Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, moving_average

LR_INCREASE = "lr_increase"
"""The cause kind of a logged learning rate that at least doubled (not a finding kind)."""

LR_NAMES = ("lr", "learning_rate")
LR_PREFIXES = ("lr_", "lr/")
LR_SUFFIXES = ("/lr", "_lr")
"""Logged metrics read as learning rates: named exactly, or starting or ending like these (any case)."""

LR_FACTOR = 2.0
"""A learning rate that grows by this factor or more from one logged value to the next is an increase."""


class Candidate(NamedTuple):
    """Something that may explain a finding: another finding (``index`` into the findings) or
    an event read from the view (``index`` -1)."""

    kind: str
    layer: str | None
    step: int
    layers: tuple[str, ...]
    index: int


@dataclass(frozen=True)
class Context:
    """What the rules read besides the two findings: the run's view and thresholds."""

    view: RunView
    thresholds: Thresholds

    @cached_property
    def smoothed_loss(self) -> np.ndarray:
        """``(N,)`` the training loss smoothed as the loss checks judge it (a trailing mean)."""
        return moving_average(self.view.loss, self.thresholds.smooth)

    def smoothed_loss_at(self, step: int) -> float:
        """The smoothed loss at the latest step at or before ``step`` where it is finite; NaN
        if there is none."""
        ok = np.isfinite(self.smoothed_loss) & (self.view.steps <= step)
        return float(self.smoothed_loss[ok][-1]) if ok.any() else float("nan")


def _starts_at_or_after(effect: Finding, cause: Candidate, ctx: Context) -> bool:
    return effect.since_step >= cause.step


def _starts_strictly_after(effect: Finding, cause: Candidate, ctx: Context) -> bool:
    return effect.since_step > cause.step


def _names_the_layer(effect: Finding, cause: Candidate, ctx: Context) -> bool:
    return effect.layer is not None and effect.layer in cause.layers and effect.since_step >= cause.step


def _within_spike_window(effect: Finding, cause: Candidate, ctx: Context) -> bool:
    return 0 <= effect.since_step - cause.step <= ctx.thresholds.spike_window


def _before_the_loss_went_wrong(effect: Finding, cause: Candidate, ctx: Context) -> bool:
    """Whether ``cause`` came before the loss problem ``effect`` began.

    A divergence's ``since_step`` is its best step, the last good one: its rise begins after
    it. The cause must come at or after that best step (a loss that kept improving after the
    cause was not broken by it) and before the loss had risen half of the way from its best
    to its latest value (most of the rise came after the cause). Underfitting is measured
    from the mean of the run's first ``Thresholds.smooth`` losses: only a cause within those
    steps comes before the model had anything to learn from.
    """
    if effect.kind == "underfitting":
        return cause.step <= effect.since_step + ctx.thresholds.smooth - 1
    best_step = int(effect.evidence.get("best_step", effect.since_step))
    if not best_step <= cause.step <= effect.step:
        return False
    best, latest = effect.evidence.get("best"), effect.evidence.get("loss")
    if best is None or latest is None:
        return True
    loss = ctx.smoothed_loss_at(cause.step)
    return not loss > best + 0.5 * (latest - best)  # NaN (no finite loss yet): not risen


@dataclass(frozen=True)
class Rule:
    """``cause`` explains findings of the kinds ``effects`` when ``fits(effect, cause, context)``.

    The first rule (in :data:`RULES` order) with a fitting candidate decides; among its
    candidates the earliest wins, or with ``nearest`` the latest (the event closest before).
    """

    effects: tuple[str, ...]
    cause: str
    fits: Callable[[Finding, Candidate, Context], bool]
    why: str
    nearest: bool = False


RULES = (
    Rule(
        ("divergence", "underfitting"),
        "nonfinite",
        _before_the_loss_went_wrong,
        "the optimizer writes NaN/Inf gradients into the weights, and a model with NaN weights "
        "predicts constants or NaN: its loss jumps and stays up",
    ),
    Rule(
        ("divergence", "underfitting"),
        "exploding",
        _before_the_loss_went_wrong,
        "a step along an exploding gradient throws the weights far from where the loss was low",
    ),
    Rule(
        ("dead", "vanishing", "stalled_updates"),
        "nonfinite",
        _starts_at_or_after,
        "NaN weights upstream zero or poison a layer's inputs (ReLU, max and torch.where turn NaN "
        "into 0), so its gradient is zero or not finite and its updates stop",
    ),
    Rule(
        ("nonfinite",),
        "exploding",
        _starts_strictly_after,
        "gradients that keep growing overflow to Inf, and Inf - Inf or 0 * Inf is NaN",
    ),
    Rule(
        ("dead",),
        "underflow",
        _names_the_layer,
        "gradients flushed to zero by a low-precision format look like a dead layer",
    ),
    Rule(
        ("exploding",),
        LR_INCREASE,
        _within_spike_window,
        "a learning rate that at least doubled (a warm-up or schedule step, a restart) makes the "
        "next steps too large: the gradient explodes within Thresholds.spike_window steps",
        nearest=True,
    ),
)
"""The causal rules, in priority order: a divergence after both a NaN and an explosion is the
NaN's; a consequence must start at or after its cause's ``since_step`` (for the loss findings
as :func:`_before_the_loss_went_wrong` says)."""


def is_lr_metric(name: str) -> bool:
    """Whether a logged metric ``name`` is read as a learning rate (see :data:`LR_NAMES`)."""
    name = name.lower()
    return name in LR_NAMES or name.startswith(LR_PREFIXES) or name.endswith(LR_SUFFIXES)


def lr_increases(view: RunView) -> list[int]:
    """Steps at which a logged learning rate grew by :data:`LR_FACTOR` or more from its
    previous logged value, sorted."""
    found = set()
    for name, (steps, values) in view.metrics.items():
        if not is_lr_metric(name) or len(values) < 2:
            continue
        before, after = values[:-1], values[1:]
        grew = (before >= 0) & (after > 0) & (after >= LR_FACTOR * before)
        found.update(int(s) for s in steps[1:][grew])
    return sorted(found)


def refers_to(cause: dict | None, finding: Finding) -> bool:
    """Whether ``cause`` names ``finding`` (same kind, layer, and ``since_step``)."""
    return (
        cause is not None
        and cause.get("kind") == finding.kind
        and cause.get("layer") == finding.layer
        and cause.get("step") == finding.since_step
    )


def describe(cause: dict) -> str:
    """``cause`` in words: "a consequence of nonfinite at step 150"."""
    if cause.get("kind") == LR_INCREASE:
        return f"after a learning-rate increase at step {cause.get('step')}"
    return f"a consequence of {cause.get('kind')} at step {cause.get('step')}"


def link(findings: list[Finding], view: RunView, thresholds: Thresholds) -> list[Finding]:
    """``findings`` with each consequence's ``cause`` set and in causal order (a new list).

    A finding that a rule of :data:`RULES` explains by another finding gets the cause at the
    root of that chain (a NaN caused by an explosion and causing a divergence: the divergence's
    cause is the explosion); one explained by a learning-rate increase gets that event. A cause
    a check already set is kept (and followed when ordering); a finding is never its own cause.

    Order: root findings (those no other finding explains), most severe first, then by
    ``since_step``; each immediately followed by its consequences, by ``since_step`` (at the
    same step, a consequence that explains another comes before it).
    """
    # A cause naming the finding itself says nothing: dropped, the one cause a check set that is not kept.
    findings = [replace(f, cause=None) if refers_to(f.cause, f) else f for f in findings]
    context = Context(view, thresholds)
    candidates = [Candidate(f.kind, f.layer, f.since_step, f.layers, i) for i, f in enumerate(findings)]
    candidates += [Candidate(LR_INCREASE, None, step, (), -1) for step in lr_increases(view)]
    parent: dict[int, int] = {}
    for i, f in enumerate(findings):  # causes the checks set: kept, and followed
        j = next((j for j, g in enumerate(findings) if j != i and refers_to(f.cause, g)), None)
        if j is not None and not _leads_to(parent, j, i):
            parent[i] = j
    events: dict[int, dict] = {}
    for i, f in enumerate(findings):
        if f.cause is not None:
            continue
        for rule in (rule for rule in RULES if f.kind in rule.effects):
            fitting = [
                c
                for c in candidates
                if c.kind == rule.cause
                and c.index != i
                and not (c.index >= 0 and _leads_to(parent, c.index, i))
                and rule.fits(f, c, context)
            ]
            if not fitting:
                continue
            # Earliest cause first; at a tie, a finding that names a layer before one that does not.
            chosen = sorted(fitting, key=lambda c: (c.step, c.layer is None))[-1 if rule.nearest else 0]
            if chosen.index >= 0:
                parent[i] = chosen.index
            else:
                events[i] = {"kind": chosen.kind, "layer": chosen.layer, "step": chosen.step}
            break
    root = {i: _root(parent, i) for i in range(len(findings))}
    linked = []
    for i, f in enumerate(findings):
        if f.cause is None and root[i] != i:
            r = findings[root[i]]
            f = replace(f, cause={"kind": r.kind, "layer": r.layer, "step": r.since_step})
        elif f.cause is None and i in events:
            f = replace(f, cause=events[i])
        linked.append(f)
    heads = sorted(
        (i for i in root if root[i] == i), key=lambda i: (-findings[i].severity_level, findings[i].since_step, i)
    )
    ordered = []
    for head in heads:
        ordered.append(linked[head])
        members = [i for i in root if root[i] == head and i != head]
        members.sort(key=lambda i: (findings[i].since_step, _depth(parent, i), i))  # a tie: the cause first
        ordered += [linked[i] for i in members]
    return ordered


def _root(parent: dict[int, int], i: int) -> int:
    while i in parent:
        i = parent[i]
    return i


def _depth(parent: dict[int, int], i: int) -> int:
    depth = 0
    while i in parent:
        i, depth = parent[i], depth + 1
    return depth


def _leads_to(parent: dict[int, int], start: int, target: int) -> bool:
    """Whether following causes from ``start`` reaches ``target`` (a link target -> start would close a loop)."""
    i = start
    while True:
        if i == target:
            return True
        if i not in parent:
            return False
        i = parent[i]


__all__ = ["LR_INCREASE", "RULES", "Rule", "describe", "is_lr_metric", "link", "lr_increases", "refers_to"]
