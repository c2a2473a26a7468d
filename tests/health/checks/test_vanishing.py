"""The ``vanishing`` check: layers whose rms over non-zero elements stays below the absolute
floor or a fraction of the largest non-exploding layer for ``sustain`` sampled steps; from
records fed to a ``RunState``, and on a real deep sigmoid stack with tiny initialisation."""

import json

import numpy as np
import pytest
import run_builders
import torch
from torch import nn

from gradscope import Thresholds
from gradscope.health.checks import vanishing
from gradscope.health.findings import SUGGESTIONS
from gradscope.health.view import view_of
from gradscope.run import records
from gradscope.stats import layout

NUMEL = 100
T = Thresholds(sustain=3, vanish_rms=1e-9, vanish_ratio=1e-5, explode_rms=10.0)


def row(rms_nonzero, zeros=0):
    """A row whose non-zero finite elements have the given rms (None: absent)."""
    values = np.zeros(layout.ROW_WIDTH)
    values[layout.NUMEL] = NUMEL
    if rms_nonzero is not None:
        values[layout.ZEROS] = zeros
        values[layout.SUMSQ] = rms_nonzero**2 * (NUMEL - zeros)
        values[layout.MAX_ABS] = rms_nonzero
    return values


def findings_of(steps, thresholds=T, zeros=None):
    """``steps``: per sampled step, the rms of each row (None: absent)."""
    names = tuple("abcdefgh"[: len(steps[0])])
    state = run_builders.run_state(names, numel=NUMEL)
    zeros = zeros or [0] * len(names)
    for step, rms in enumerate(steps):
        rows = np.stack([row(value, z) for value, z in zip(rms, zeros, strict=True)])
        state.apply(records.Sampled(step, rows, np.array([v is not None for v in rms]), np.full(len(rms), -1)))
    return vanishing.detect(view_of(state, thresholds), thresholds)


def test_a_layer_far_below_the_largest_for_sustain_steps():
    steps = [[1.0, 0.1, 0.5], [1.0, 4e-6, 0.5], [2.0, 5e-6, 0.5], [1.0, 3e-6, 0.5]]
    (finding,) = findings_of(steps)
    assert (finding.kind, finding.severity, finding.layer) == ("vanishing", "warning", "b")
    assert finding.layers == ("b",)
    assert finding.step == 3 and finding.since_step == 1
    assert finding.evidence == {"floor": 1e-9, "ratio": 1e-5, "largest_rms": 1.0, "rms": {"b": pytest.approx(3e-6)}}
    assert "gradients vanish in 1 layers ('b') for 3 sampled steps: rms 3.00e-06 in 'b'" in finding.message
    assert "against 1.00e+00 in the largest layer" in finding.message
    assert finding.suggestion == SUGGESTIONS["vanishing"]
    json.dumps(finding.to_dict())


def test_one_step_short_of_sustain_is_silent():
    assert findings_of([[1.0, 0.1, 0.5], [1.0, 0.1, 0.5], [1.0, 4e-6, 0.5], [1.0, 3e-6, 0.5]]) == []


def test_just_above_the_ratio_is_silent():
    assert findings_of([[1.0, 2e-5, 0.5]] * 5) == []
    (finding,) = findings_of([[1.0, 0.5e-5, 0.5]] * 5)
    assert finding.layer == "b" and "for at least 5 sampled steps" in finding.message


def test_the_absolute_floor_catches_uniformly_tiny_gradients():
    (finding,) = findings_of([[5e-10, 2e-10, 8e-10]] * 3)
    assert set(finding.layers) == {"a", "b", "c"}
    assert finding.layer == "b"  # the smallest
    assert finding.evidence["largest_rms"] == pytest.approx(8e-10)
    assert findings_of([[2e-9, 2e-9, 2e-9]] * 3) == []


def test_absent_steps_neither_break_nor_extend_the_run():
    # b: tiny, absent, tiny: two steps, one short of sustain
    steps = [[1.0, 0.1], [1.0, 1e-7], [1.0, None], [1.0, 1e-7]]
    assert findings_of(steps) == []
    (finding,) = findings_of([*steps, [1.0, 1e-7]])
    assert finding.layer == "b" and finding.since_step == 1 and "for 3 sampled steps" in finding.message
    (finding,) = findings_of([*steps, [1.0, 1e-7], [1.0, None]])  # absent at the end: still reported
    assert finding.evidence["rms"] == {"b": pytest.approx(1e-7)}


def test_exploding_layers_are_not_the_reference():
    # 'a' explodes (rms 1e6 above explode_rms): next to it, 'b' would be 1e-6 of the largest.
    assert findings_of([[1e6, 1.0, 1e-3]] * 4) == []
    (finding,) = findings_of([[1e6, 1.0, 1e-7]] * 4)
    assert finding.layer == "c" and finding.layers == ("c",)
    assert finding.evidence["largest_rms"] == 1.0  # the largest non-exploding layer


def test_a_layer_at_the_exploding_ceiling_is_still_a_reference():
    (finding,) = findings_of([[10.0, 1e-5, 1.0]] * 3)
    assert finding.layer == "b" and finding.evidence["largest_rms"] == 10.0


def test_sparse_gradients_are_judged_by_their_non_zero_values():
    # 'b' is 99% exact zeros: its rms over all elements (~1e-6) would look vanishing; the
    # values it does have are 1e-5 of 'a', not less.
    assert findings_of([[1.0, 2e-5, 0.5]] * 4, zeros=[0, 99, 0]) == []
    # A dense layer with the same rms over all elements (2e-5 * sqrt(1 / 100)) does vanish.
    (finding,) = findings_of([[1.0, 2e-6, 0.5]] * 4)
    assert finding.layer == "b"


def test_all_zero_layers_are_dead_not_vanishing():
    assert findings_of([[1.0, 0.0, 0.5]] * 4, zeros=[0, NUMEL, 0]) == []


def test_several_layers_report_the_smallest_and_the_shortest_run():
    steps = [[1.0, 0.5, 0.5], [1.0, 1e-7, 0.5], [1.0, 1e-7, 1e-8], [1.0, 1e-7, 1e-8], [1.0, 1e-7, 1e-8]]
    (finding,) = findings_of(steps)
    assert finding.layer == "c" and finding.layers == ("b", "c")
    assert finding.since_step == 2  # the later start of the two
    assert "for 3 sampled steps" in finding.message
    assert finding.evidence["rms"] == {"b": pytest.approx(1e-7), "c": pytest.approx(1e-8)}


# --------------------------------------------------------------------------------------
# A real model
# --------------------------------------------------------------------------------------


def deep_sigmoid(depth=8, width=16, std=0.01):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.normal_(linear.weight, 0.0, std)  # tiny weights: each layer shrinks the gradient ~100x
        layers += [linear, nn.Sigmoid()]
    return nn.Sequential(*layers)


def train(model, steps, thresholds):
    return run_builders.train_and_report(model, steps, (8, 16), thresholds=thresholds)


def test_deep_sigmoid_stack_with_tiny_init():
    report = train(deep_sigmoid(), steps=2, thresholds=Thresholds(sustain=2))
    (finding,) = [f for f in report.findings if f.kind == "vanishing"]
    assert finding.layer == "0"  # nearest the input: the smallest gradient
    assert "0" in finding.layers and "14" not in finding.layers  # the last layer is the reference
    rms = finding.evidence["rms"]
    assert rms["0"] < 1e-5 * finding.evidence["largest_rms"]
    assert rms["0"] == min(rms.values())
    by_name = {row.name: row for row in report.layers}
    assert finding.evidence["largest_rms"] == pytest.approx(max(row.rms for row in report.layers))
    assert by_name["0"].status == "warning" and by_name["14"].status == "healthy"


def test_deep_sigmoid_stack_one_step_short_of_sustain_is_silent():
    report = train(deep_sigmoid(), steps=2, thresholds=Thresholds(sustain=3))
    assert not [f for f in report.findings if f.kind == "vanishing"], str(report)


def test_a_shallow_well_initialised_stack_is_silent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 16))
    report = train(model, steps=3, thresholds=Thresholds(sustain=2))
    assert not [f for f in report.findings if f.kind == "vanishing"], str(report)
