"""The ``expert_starvation`` check, from records fed to a ``RunState``: experts of a sibling
group with at least ``MIN_EXPERTS`` members that received no gradient for ``sustain`` sampled
steps of the group while their siblings did. (Real mixtures of experts trained under
``gradscope.watch``: ``tests/health/test_real_failures_moe.py``.)"""

import dataclasses
import json

import numpy as np
import pytest
import run_builders

from gradscope import Thresholds
from gradscope.health.checks import expert_starvation
from gradscope.health.findings import SUGGESTIONS
from gradscope.health.view import view_of
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats import layout

T = Thresholds(sustain=3)
NUMEL = 10


def findings_of(steps: list[str], experts: int = 4, thresholds: Thresholds = T):
    """``steps``: per sampled step, one character per expert: ``x`` it received a gradient,
    ``.`` it was absent. Each expert has two rows (``moe.experts.<e>.w_in`` and ``.w_out``);
    a ``router`` row is present at every step."""
    rows = ["moe.router"] + [f"moe.experts.{e}.{w}" for e in range(experts) for w in ("w_in", "w_out")]
    info = dataclasses.replace(
        run_builders.run_info(rows, numel=NUMEL),
        sibling_groups={"moe.experts": tuple(str(e) for e in range(experts))},
    )
    state = RunState(info)
    for step, received in enumerate(steps):
        present = np.array([True] + [c == "x" for c in received for _ in range(2)])
        values = np.zeros((len(rows), layout.ROW_WIDTH))
        values[:, layout.NUMEL] = NUMEL
        values[:, layout.SUMSQ] = 0.1
        values[:, layout.MAX_ABS] = 0.1
        state.apply(records.Sampled(step, values, present, np.full(len(rows), -1)))
    return expert_starvation.detect(view_of(state, thresholds), thresholds)


def test_experts_without_gradient_for_sustain_steps_are_named():
    (finding,) = findings_of(["xxxx", "x.x.", "x.x.", "x.x."])
    assert (finding.kind, finding.severity, finding.layer) == ("expert_starvation", "warning", "moe.experts")
    assert finding.step == 3 and finding.since_step == 1
    assert finding.evidence == {
        "experts": ["moe.experts.1", "moe.experts.3"],
        "starved": 2,
        "group_size": 4,
        "fraction": 0.5,
        "sampled_steps": 3,
    }
    assert finding.message == (
        "2 of 4 experts of 'moe.experts' (50%) received no gradient while the others did, "
        "for 3 sampled steps: 'moe.experts.1', 'moe.experts.3'"
    )
    assert finding.suggestion == SUGGESTIONS["expert_starvation"]
    json.dumps(finding.to_dict())


def test_the_shortest_starvation_is_reported_and_at_least_when_it_reaches_the_window_start():
    (finding,) = findings_of(["x.xx", "x.x.", "x.x.", "x.x."])
    assert finding.evidence["experts"] == ["moe.experts.1", "moe.experts.3"]
    assert finding.evidence["sampled_steps"] == 3 and finding.since_step == 1
    (finding,) = findings_of(["x.x."] * 3)
    assert "for at least 3 sampled steps" in finding.message and finding.since_step == 0


def test_one_step_short_of_sustain_is_silent():
    assert findings_of(["xxxx", "xxxx", "x.x.", "x.x."]) == []
    (finding,) = findings_of(["x.x.", "x.x.", "xxx.", "x.x.", "x.x."])  # expert 1: 2 steps since its return
    assert finding.evidence["experts"] == ["moe.experts.3"]


def test_an_expert_that_receives_a_gradient_again_ends_its_starvation():
    (finding,) = findings_of(["x.x.", "x.x.", "x.x.", "xxx."])
    assert finding.evidence["experts"] == ["moe.experts.3"] and finding.evidence["fraction"] == 0.25
    assert finding.message.startswith("1 of 4 experts of 'moe.experts' (25%)")


def test_balanced_routing_is_silent_though_every_step_leaves_some_out():
    assert findings_of(["xx..", "..xx", "x.x.", ".x.x", "xx..", "..xx"]) == []


def test_steps_the_whole_group_missed_neither_break_nor_extend_a_starvation():
    """A sampled step where no expert of the group had a gradient (a failed step, a skipped
    block) says nothing about routing."""
    assert findings_of(["xxxx", "x.x.", "....", "x.x."]) == []
    (finding,) = findings_of(["xxxx", "x.x.", "....", "x.x.", "x.x."])
    assert finding.evidence["sampled_steps"] == 3 and finding.since_step == 1 and finding.step == 4
    (finding,) = findings_of(["x.x.", "x.x.", "x.x.", "...."])
    assert finding.step == 2, "the step is the group's latest step with a gradient"
    assert findings_of(["...."] * 5) == [], "a group that never had a gradient (frozen, unused) is no starvation"


@pytest.mark.parametrize("experts", [2, 3])
def test_fewer_than_min_experts_siblings_are_no_mixture_of_experts(experts):
    assert expert_starvation.MIN_EXPERTS == 4
    assert findings_of(["x" + "." * (experts - 1)] * 4, experts=experts) == []
    assert len(findings_of(["x..."] * 4, experts=4)) == 1
