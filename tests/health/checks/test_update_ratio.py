"""The ``stalled_updates`` check (``update_ratio``): ``||update|| / ||weight||`` below
``update_ratio_low`` or above ``update_ratio_high`` for ``sustain`` sampled steps with an
optimizer step; all-zero gradients are not 'low', weights of norm ~0 are not judged. From
records fed to a ``RunState``, and on a real model trained with SGD at lr=1e-12."""

import json

import numpy as np
import pytest
import run_builders
import torch
from torch import nn

from gradscope import Thresholds
from gradscope.health.checks import update_ratio
from gradscope.health.findings import SUGGESTIONS
from gradscope.health.view import view_of
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats import layout

NUMEL = 10
T = Thresholds(sustain=3, update_ratio_low=1e-7, update_ratio_high=0.1)


def run_state(names, track_updates=True) -> RunState:
    return run_builders.run_state(names, numel=NUMEL, track_updates=track_updates)


def findings_of(ratios, weights=None, zeros=None, thresholds=T, track_updates=True):
    """``ratios``: per sampled step, each row's update/weight ratio (None: no optimizer step
    seen for that step); ``weights``: each row's weight norm (default 2); ``zeros``: each
    row's count of exact zeros in its gradient (of 10)."""
    names = tuple("abcdefgh"[: len(ratios[0] or weights or zeros)])
    weights = np.array(weights or [2.0] * len(names))
    zeros = np.array(zeros or [0] * len(names))
    state = run_state(names, track_updates)
    for step, ratio in enumerate(ratios):
        rows = np.zeros((len(names), layout.ROW_WIDTH))
        rows[:, layout.NUMEL] = NUMEL
        rows[:, layout.ZEROS] = zeros
        rows[:, layout.SUMSQ] = 0.01 * (NUMEL - zeros)
        state.apply(records.Sampled(step, rows, np.ones(len(names), bool), np.full(len(names), -1)))
        if ratio is not None:
            state.apply(records.Updates(step, weights**2, (np.array(ratio) * weights) ** 2))
    return update_ratio.detect(view_of(state, thresholds), thresholds)


def test_ratio_below_the_low_bound_for_sustain_steps():
    (finding,) = findings_of([[1e-3, 1e-3], [1e-3, 1e-8], [1e-3, 2e-8], [1e-3, 4e-8]])
    assert (finding.kind, finding.severity, finding.layer) == ("stalled_updates", "warning", "b")
    assert finding.layers == ("b",)
    assert finding.step == 3 and finding.since_step == 1
    assert finding.evidence == {"side": "low", "bound": 1e-7, "ratio": {"b": pytest.approx(4e-8)}}
    assert finding.suggestion == SUGGESTIONS["stalled_updates_low"]
    assert "too small: learning rate too low? in 1 layers ('b'): median 4.00e-08" in finding.message
    assert "against the lower bound 1e-07" in finding.message
    json.dumps(finding.to_dict())


def test_ratio_above_the_high_bound_for_sustain_steps():
    (finding,) = findings_of([[0.5, 1e-3, 0.3]] * 3)
    assert finding.evidence["side"] == "high" and finding.evidence["bound"] == 0.1
    assert finding.layer == "a" and finding.layers == ("a", "c")  # model order
    assert finding.evidence["ratio"] == {"a": pytest.approx(0.5), "c": pytest.approx(0.3)}
    assert "median 4.00e-01 against the upper bound 0.1" in finding.message
    assert finding.suggestion == SUGGESTIONS["stalled_updates_high"]


def test_both_sides_at_once():
    found = findings_of([[1e-9, 1e-3, 0.5]] * 3)
    assert [(f.evidence["side"], f.layers) for f in found] == [("low", ("a",)), ("high", ("c",))]


def test_one_step_short_of_sustain_is_silent():
    assert findings_of([[1e-3], [1e-3], [1e-8], [1e-8]]) == []
    assert findings_of([[1e-3], [1e-3], [0.5], [0.5]]) == []


def test_inside_the_bounds_is_silent():
    assert findings_of([[2e-7, 1e-3, 0.09]] * 6) == []


def test_steps_without_an_optimizer_step_neither_break_nor_extend_the_run():
    steps = [[1e-3], [1e-8], None, [1e-8]]
    assert findings_of(steps) == []
    (finding,) = findings_of([*steps, [1e-8]])
    assert finding.since_step == 1 and finding.step == 4
    (finding,) = findings_of([*steps, [1e-8], None])
    assert finding.step == 4, "the latest step with an optimizer step"


def test_an_all_zero_gradient_is_not_a_low_ratio():
    # 'b' receives no gradient at all (a dead layer): nothing to apply, so no update.
    assert findings_of([[1e-3, 0.0]] * 4, zeros=[0, NUMEL]) == []
    (finding,) = findings_of([[1e-3, 0.0]] * 4, zeros=[0, NUMEL - 1])  # one non-zero element: judged
    assert finding.layer == "b" and finding.evidence["ratio"] == {"b": 0.0}
    # A large update of a layer without gradient (momentum) is still too large.
    (finding,) = findings_of([[1e-3, 0.5]] * 4, zeros=[0, NUMEL])
    assert finding.evidence["side"] == "high" and finding.layer == "b"


@pytest.mark.parametrize("ratio", [1e-9, 1e3])
def test_weights_of_norm_about_zero_are_not_judged(ratio):
    weights = [2.0, 1e-13]  # 'b' is (nearly) all zeros
    assert findings_of([[1e-3, ratio]] * 4, weights=weights) == []
    (finding,) = findings_of([[1e-3, ratio]] * 4, weights=[2.0, 1e-11])
    assert finding.layer == "b"


def test_zero_weights_and_zero_updates_are_silent():
    state = run_state(("a",))
    for step in range(4):
        rows = np.zeros((1, layout.ROW_WIDTH))
        rows[:, layout.NUMEL] = NUMEL
        rows[:, layout.SUMSQ] = 0.1
        state.apply(records.Sampled(step, rows, np.ones(1, bool), np.zeros(1)))
        state.apply(records.Updates(step, np.zeros(1), np.zeros(1)))  # 0 / 0
    assert update_ratio.detect(view_of(state, T), T) == []


def test_evidence_is_each_rows_latest_finite_ratio():
    state = run_state(("a", "b"))
    for step in range(4):
        rows = np.zeros((2, layout.ROW_WIDTH))
        rows[:, layout.NUMEL] = NUMEL
        rows[:, layout.SUMSQ] = 0.1
        state.apply(records.Sampled(step, rows, np.ones(2, bool), np.zeros(2)))
        weight_sq = np.array([4.0, 4.0]) if step < 3 else np.array([0.0, 4.0])
        update_sq = np.array([4e-18, 4e-6]) if step < 3 else np.array([0.0, 4e-6])  # 'a': 1e-9, then 0 / 0
        state.apply(records.Updates(step, weight_sq, update_sq))
    (finding,) = update_ratio.detect(view_of(state, T), T)
    assert finding.layers == ("a",)
    assert finding.evidence["ratio"] == {"a": pytest.approx(1e-9)}
    assert "median 1.00e-09" in finding.message
    json.dumps(finding.to_dict(), allow_nan=False)


def test_without_update_tracking_nothing_is_judged():
    state = run_state(("a",), track_updates=False)
    rows = np.zeros((1, layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = NUMEL
    for step in range(4):
        state.apply(records.Sampled(step, rows, np.ones(1, bool), np.zeros(1)))
        state.apply(records.Updates(step, np.ones(1), np.zeros(1)))  # ignored without tracking
    view = view_of(state, T)
    assert view.update_ratio is None and update_ratio.detect(view, T) == []


# --------------------------------------------------------------------------------------
# A real model
# --------------------------------------------------------------------------------------


class TwoBranches(nn.Module):
    """'live' and 'dead' (bias -50 before a ReLU: all-zero gradient) feed 'head'."""

    def __init__(self):
        super().__init__()
        self.live = nn.Linear(8, 8)
        self.dead = nn.Linear(8, 8)
        self.head = nn.Linear(16, 1)
        with torch.no_grad():
            self.dead.bias.fill_(-50.0)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.live(x)), torch.relu(self.dead(x))], dim=1))


def train(model, lr, steps, thresholds):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return run_builders.train_and_report(
        model, steps, (16, 8), thresholds=thresholds, optimizer=opt, track_updates=True
    )


def test_tiny_learning_rate_is_a_low_ratio_except_where_there_is_no_gradient():
    torch.manual_seed(0)
    report = train(TwoBranches(), lr=1e-12, steps=3, thresholds=Thresholds(sustain=2))
    (low,) = [f for f in report.findings if f.kind == "stalled_updates"]
    assert low.evidence["side"] == "low" and low.suggestion == SUGGESTIONS["stalled_updates_low"]
    assert low.layers == ("live", "head")  # not 'dead': its gradient is all zeros
    assert low.layer == "live"
    assert all(0 <= ratio < 1e-7 for ratio in low.evidence["ratio"].values()), low.evidence
    assert [f.layer for f in report.findings if f.kind == "dead"] == ["dead"]
    by_name = {row.name: row for row in report.layers}
    assert by_name["dead"].update_ratio == 0.0 and by_name["dead"].zero_frac == 1.0


def test_tiny_learning_rate_one_step_short_of_sustain_is_silent():
    torch.manual_seed(0)
    report = train(TwoBranches(), lr=1e-12, steps=2, thresholds=Thresholds(sustain=3))
    assert not [f for f in report.findings if f.kind == "stalled_updates"], str(report)


def test_a_usual_learning_rate_is_silent():
    torch.manual_seed(0)
    report = train(TwoBranches(), lr=1e-2, steps=3, thresholds=Thresholds(sustain=2))
    assert not [f for f in report.findings if f.kind == "stalled_updates"], str(report)
    ratios = [row.update_ratio for row in report.layers if row.name != "dead"]
    assert all(1e-7 < ratio < 0.1 for ratio in ratios), ratios
