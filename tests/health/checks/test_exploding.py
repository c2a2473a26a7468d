"""The ``exploding`` check: layers above the rms ceiling for ``sustain`` sampled steps (named by
backward order when known), spikes of the total norm against its running median, and steady
rises; from records fed to a ``RunState``, and on a real model whose custom autograd
Function multiplies the gradient by 1e5."""

import json
import math

import numpy as np
import pytest
import run_builders
import torch
from torch import nn

import gradscope
from gradscope import Thresholds
from gradscope.health.checks import exploding
from gradscope.health.findings import SUGGESTIONS
from gradscope.health.view import view_of
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats import layout

NAMES = ("a", "b", "c")
NUMEL = 4


def run_state(names=NAMES) -> RunState:
    return run_builders.run_state(names, numel=NUMEL)


def sampled(step, rms, order=None) -> records.Sampled:
    """A sampled step whose rows have the given rms (None: absent)."""
    rows = np.zeros((len(rms), layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = NUMEL
    for r, value in enumerate(rms):
        if value is not None:
            rows[r, layout.SUMSQ] = value**2 * NUMEL
            rows[r, layout.MAX_ABS] = value
    present = np.array([value is not None for value in rms])
    order = np.full(len(rms), -1) if order is None else np.array(order)
    return records.Sampled(step, rows, present, order)


def findings_of(steps_rms, thresholds, order=None):
    state = run_state(names=tuple("abcdefgh"[: len(steps_rms[0])]))
    for step, rms in enumerate(steps_rms):
        state.apply(sampled(step, rms, order))
    return exploding.detect(view_of(state, thresholds), thresholds)


def ceiling_findings(found):
    return [f for f in found if f.layer is not None]


# --------------------------------------------------------------------------------------
# The rms ceiling
# --------------------------------------------------------------------------------------

CEILING = Thresholds(sustain=3, explode_rms=10.0, spike_factor=1e6)


def test_a_layer_above_the_ceiling_for_sustain_steps():
    found = findings_of([[1.0, 1.0, 1.0], [1.0, 20.0, 1.0], [1.0, 30.0, 1.0], [1.0, 40.0, 1.0]], CEILING)
    (finding,) = found
    assert (finding.kind, finding.severity, finding.layer) == ("exploding", "warning", "b")
    assert finding.layers == ("b",)
    assert finding.step == 3 and finding.since_step == 1
    assert finding.evidence == {"ceiling": 10.0, "rms": {"b": 40.0}, "largest": "b", "first_in_backward_order": None}
    assert "above 10 for 3 sampled steps in 1 layers ('b'); largest 40 in 'b'" in finding.message
    assert finding.suggestion == SUGGESTIONS["exploding"]
    json.dumps(finding.to_dict())


def test_one_step_short_of_sustain_is_silent():
    assert findings_of([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 20.0, 1.0], [1.0, 30.0, 1.0]], CEILING) == []


def test_at_the_ceiling_is_not_above_it():
    assert findings_of([[1.0, 10.0, 1.0]] * 5, CEILING) == []
    (finding,) = findings_of([[1.0, 10.001, 1.0]] * 5, CEILING)
    assert finding.layer == "b" and "for at least 5 sampled steps" in finding.message  # since the window's start


def test_absent_steps_neither_break_nor_extend_the_run():
    # b: below, above, absent, above: two steps above, one short of sustain
    steps = [[1.0, 1.0, 1.0], [1.0, 20.0, 1.0], [1.0, None, 1.0], [1.0, 20.0, 1.0]]
    assert findings_of(steps, CEILING) == []
    (finding,) = findings_of([*steps, [1.0, 25.0, 1.0]], CEILING)  # the third step above
    assert finding.layer == "b" and finding.since_step == 1 and finding.step == 4
    assert "for 3 sampled steps" in finding.message
    assert finding.evidence["rms"] == {"b": 25.0}
    # Absent at the latest step: the layer's latest present value is reported.
    (finding,) = findings_of([*steps, [1.0, 25.0, 1.0], [1.0, None, 1.0]], CEILING)
    assert finding.evidence["rms"] == {"b": 25.0} and finding.step == 5


def test_several_layers_are_listed_largest_first():
    steps = [[50.0, 12.0, 30.0]] * 3
    (finding,) = findings_of(steps, CEILING)
    assert finding.layer == "a" and finding.layers == ("a", "c", "b")  # without backward order: the largest
    assert finding.evidence["rms"] == {"a": 50.0, "b": 12.0, "c": 30.0}


def test_the_first_layer_in_backward_order_is_the_one_to_look_at():
    steps = [[12.0, 1.0, 50.0]] * 3
    # backward order: 'a' is reached first (nearest the loss) though 'c' is larger
    (finding,) = findings_of(steps, CEILING, order=[0, 1, 2])
    assert finding.layer == "a" and finding.layers == ("c", "a")
    assert finding.evidence["largest"] == "c" and finding.evidence["first_in_backward_order"] == "a"
    assert "first in backward order (nearest the loss) 'a'; largest 50 in 'c'" in finding.message
    assert finding.since_step == 0
    # backward order known for only some of them: fall back to the largest
    (finding,) = findings_of(steps, CEILING, order=[0, 1, -1])
    assert finding.layer == "c" and finding.evidence["first_in_backward_order"] is None


def test_a_single_layer_in_backward_order_names_no_origin_in_the_message():
    (finding,) = findings_of([[1.0, 20.0, 1.0]] * 3, CEILING, order=[2, 1, 0])
    assert finding.layer == "b" and finding.evidence["first_in_backward_order"] == "b"
    assert "first in backward order" not in finding.message


# --------------------------------------------------------------------------------------
# Spikes of the total norm
# --------------------------------------------------------------------------------------

SPIKES = Thresholds(spike_factor=10.0, spike_window=8, explode_rms=1e9)


def norms_to_rms(norms):
    """One row per step whose total norm is ``norm`` (rms = norm / sqrt(numel))."""
    return [[norm / math.sqrt(NUMEL)] for norm in norms]


def test_a_spike_above_spike_factor_times_the_running_median():
    norms = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 25.0, 2.0]  # median of the six before: 1.5
    (finding,) = findings_of(norms_to_rms(norms), SPIKES)
    assert (finding.kind, finding.severity, finding.layer) == ("exploding", "warning", None)
    assert finding.step == finding.since_step == 6
    assert finding.evidence["norm"] == pytest.approx(25.0)
    assert finding.evidence["running_median"] == pytest.approx(1.5)
    assert finding.evidence["spike_steps"] == [6]
    assert "spiked to 25 at step 6, 17x its running median (1.5); 1 spikes recently" in finding.message
    json.dumps(finding.to_dict())


def test_at_spike_factor_is_no_spike():
    assert findings_of(norms_to_rms([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 15.0, 2.0]), SPIKES) == []
    assert len(findings_of(norms_to_rms([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 15.1, 2.0]), SPIKES)) == 1


def test_a_spike_needs_five_previous_steps():
    assert findings_of(norms_to_rms([1.0, 1.0, 1.0, 1.0, 500.0]), SPIKES) == []
    (finding,) = findings_of(norms_to_rms([1.0, 1.0, 1.0, 1.0, 1.0, 500.0]), SPIKES)
    assert finding.step == 5


def test_zero_norms_do_not_count_toward_the_running_median():
    # Four zero-gradient steps: only three positive norms before the jump.
    assert findings_of(norms_to_rms([0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 50.0]), SPIKES) == []
    (finding,) = findings_of(norms_to_rms([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 50.0]), SPIKES)
    assert finding.evidence["running_median"] == pytest.approx(1.0)


def test_several_spikes_report_the_last_and_since_the_first():
    norms = [1.0] * 6 + [30.0, 1.0, 40.0, 1.0]
    (finding,) = findings_of(norms_to_rms(norms), SPIKES)
    assert finding.evidence["spike_steps"] == [6, 8]
    assert finding.step == 8 and finding.since_step == 6 and finding.evidence["norm"] == pytest.approx(40.0)
    assert "2 spikes recently" in finding.message


def test_spikes_are_forgotten_after_spike_window_steps():
    spike = [1.0] * 6 + [100.0]
    (finding,) = findings_of(norms_to_rms(spike + [1.0] * 7), SPIKES)  # still among the last 8 steps
    assert finding.step == 6
    assert findings_of(norms_to_rms(spike + [1.0] * 8), SPIKES) == []


# --------------------------------------------------------------------------------------
# Steady rises of the total norm
# --------------------------------------------------------------------------------------

TREND = Thresholds(trend_window=10, trend_growth=100.0, spike_factor=1e6, explode_rms=1e9)


def rising(decades, steps=10, start=1e-3):
    """Norms rising geometrically by ``decades`` powers of ten over ``steps`` steps."""
    return list(start * 10 ** (decades * np.arange(steps) / (steps - 1)))


def test_a_steady_rise_over_trend_window():
    norms = [1e-3] * 5 + rising(2.2)
    (finding,) = findings_of(norms_to_rms(norms), TREND)
    assert (finding.kind, finding.severity, finding.layer) == ("exploding", "warning", None)
    assert finding.step == 14 and finding.since_step == 5
    assert finding.evidence["growth"] == pytest.approx(10**2.2, rel=1e-9)
    assert finding.evidence["correlation"] == pytest.approx(1.0)
    assert finding.evidence["window"] == 10
    assert "rose steadily 158x over the last 10 sampled steps (now 0.158)" in finding.message
    json.dumps(finding.to_dict())


def test_a_rise_below_trend_growth_is_silent():
    assert findings_of(norms_to_rms(rising(1.9)), TREND) == []


def test_a_rise_needs_trend_window_steps():
    assert findings_of(norms_to_rms(rising(3.0, steps=9)), TREND) == []


def test_a_rise_must_be_steady():
    # Same overall growth (x1000), but flat for the first half: a jump, not a steady rise.
    norms = [1e-3] * 8 + [1.0] * 2
    found = findings_of(norms_to_rms(norms), TREND)
    assert not [f for f in found if "rose steadily" in f.message]
    # Noisy zig-zag of large amplitude with an upward drift: correlation below 0.9.
    zigzag = [1e-3 * (1e3 if i % 2 else 1.0) * 10 ** (0.25 * i) for i in range(10)]
    assert findings_of(norms_to_rms(zigzag), TREND) == []


# --------------------------------------------------------------------------------------
# A real model
# --------------------------------------------------------------------------------------


class Amplify(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by 1e5 (a faulty custom op)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e5


class AmplifiedNet(nn.Module):
    """``inner -> relu -> near -> Amplify -> head``: the faulty op sits between 'near' and 'head',
    so 'near' (first in backward order) and 'inner' (upstream of it, made larger still by the
    large weight of 'near') explode while 'head' does not."""

    def __init__(self, faulty: bool = True):
        super().__init__()
        self.inner = nn.Linear(16, 16)
        self.near = nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)
        self.faulty = faulty
        with torch.no_grad():
            self.near.weight.mul_(10)

    def forward(self, x):
        x = self.near(torch.relu(self.inner(x)))
        return self.head(Amplify.apply(x) if self.faulty else x)


def train(model, steps):
    return run_builders.train_and_report(model, steps, (8, 16))


def test_amplifying_custom_function_names_the_layer_nearest_the_loss():
    torch.manual_seed(0)
    report = train(AmplifiedNet(), steps=3)
    (finding,) = [f for f in report.findings if f.kind == "exploding"]
    assert finding.layer == "near" and set(finding.layers) == {"inner", "near"}
    assert finding.evidence["first_in_backward_order"] == "near"
    assert finding.evidence["largest"] == "inner"  # so the origin, not the largest, is named
    assert min(finding.evidence["rms"].values()) > 10
    assert {row.name: row.status for row in report.layers} == {"inner": "warning", "near": "warning", "head": "healthy"}


def test_amplified_gradients_for_one_step_short_of_sustain_are_silent():
    torch.manual_seed(0)
    model = AmplifiedNet()
    g = torch.Generator().manual_seed(0)
    with gradscope.watch(model) as mon:
        for step in range(3):
            model.faulty = step == 2  # one faulty step: one short of sustain=2
            model(torch.randn(8, 16, generator=g)).square().mean().backward()
            mon.step()
            model.zero_grad()
        report = mon.report(thresholds=Thresholds(sustain=2, spike_factor=1e9))
    assert not [f for f in report.findings if f.kind == "exploding"], str(report)


def test_the_same_net_without_the_fault_is_silent():
    torch.manual_seed(0)
    report = train(AmplifiedNet(faulty=False), steps=3)
    assert not [f for f in report.findings if f.kind == "exploding"], str(report)
