"""The ``dead`` check: layers whose gradient is at least ``dead_zero_frac`` exact zeros for
``sustain`` sampled steps, embeddings excepted; from records fed to a ``RunState``, and on a
real model whose Linear has a bias of -50 in front of a ReLU."""

import json

import numpy as np
import run_builders
import torch
from torch import nn

from gradscope import Thresholds
from gradscope.health.checks import dead
from gradscope.health.findings import SUGGESTIONS
from gradscope.health.view import view_of
from gradscope.run import records
from gradscope.stats import layout

NUMEL = 100
T = Thresholds(sustain=3, dead_zero_frac=0.99)


def findings_of(steps, types=None, thresholds=T):
    """``steps``: per sampled step, each row's count of exact zeros among 100 (None: absent)."""
    names = tuple("abcdefgh"[: len(steps[0])])
    state = run_builders.run_state(names, numel=NUMEL, row_types=types)
    for step, zeros in enumerate(steps):
        rows = np.zeros((len(zeros), layout.ROW_WIDTH))
        rows[:, layout.NUMEL] = NUMEL
        for r, z in enumerate(zeros):
            if z is not None:
                rows[r, layout.ZEROS] = z
                rows[r, layout.SUMSQ] = 0.01 * (NUMEL - z)
                rows[r, layout.MAX_ABS] = 0.1 if z < NUMEL else 0.0
        present = np.array([z is not None for z in zeros])
        state.apply(records.Sampled(step, rows, present, np.full(len(zeros), -1)))
    return dead.detect(view_of(state, thresholds), thresholds)


def test_an_all_zero_layer_for_sustain_steps():
    (finding,) = findings_of([[0, 0, 0], [0, 100, 0], [0, 100, 0], [0, 100, 0]])
    assert (finding.kind, finding.severity, finding.layer) == ("dead", "warning", "b")
    assert finding.layers == ("b",)
    assert finding.step == 3 and finding.since_step == 1
    assert finding.evidence == {"zero_frac": 1.0, "threshold": 0.99, "numel": 100}
    assert finding.message == "100.0% of the gradient of 'b' is exactly zero, for 3 sampled steps"
    assert finding.suggestion == SUGGESTIONS["dead"]
    json.dumps(finding.to_dict())


def test_one_step_short_of_sustain_is_silent():
    assert findings_of([[0, 0, 0], [0, 0, 0], [0, 100, 0], [0, 100, 0]]) == []


def test_the_zero_fraction_threshold_is_inclusive():
    (finding,) = findings_of([[0, 99, 0]] * 3)  # exactly 0.99
    assert finding.evidence["zero_frac"] == 0.99
    assert finding.message == "99.0% of the gradient of 'b' is exactly zero, for at least 3 sampled steps"
    assert findings_of([[0, 98, 0]] * 3) == []


def test_one_live_step_ends_the_run():
    assert findings_of([[100], [100], [100], [50], [100], [100]]) == []


def test_absent_steps_neither_break_nor_extend_the_run():
    steps = [[0, 0], [0, 100], [0, None], [0, 100]]  # two dead steps around an absent one
    assert findings_of(steps) == []
    (finding,) = findings_of([*steps, [0, 100]])
    assert finding.since_step == 1 and finding.step == 4 and "for 3 sampled steps" in finding.message
    (finding,) = findings_of([*steps, [0, 100], [0, None]])
    assert finding.step == 4, "the step is the layer's latest present step"
    assert findings_of([[0, 0], [0, 100], [0, None], [0, None], [0, 100]]) == []


def test_embeddings_are_sparse_by_design():
    steps = [[100, 100, 100, 100]] * 4
    found = findings_of(steps, types=["Embedding", "EmbeddingBag", "Linear", "Conv2d"])
    assert [f.layer for f in found] == ["c", "d"]
    assert dead.SPARSE_BY_DESIGN == ("Embedding", "EmbeddingBag")


def test_healthy_run_is_silent():
    assert findings_of([[0, 3, 50]] * 10) == []


# --------------------------------------------------------------------------------------
# A real model
# --------------------------------------------------------------------------------------


def train(model, steps, thresholds):
    return run_builders.train_and_report(model, steps, (16, 8), thresholds=thresholds)


def dead_relu_net(bias=-50.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].bias.fill_(bias)  # every pre-activation is far below zero: the ReLU never opens
    return model


def test_linear_with_a_large_negative_bias_before_a_relu_is_dead():
    report = train(dead_relu_net(), steps=3, thresholds=Thresholds(sustain=2))
    found = [f for f in report.findings if f.kind == "dead"]
    assert [f.layer for f in found] == ["0"], str(report)
    assert found[0].evidence["zero_frac"] == 1.0 and found[0].evidence["numel"] == 8 * 16 + 16
    # '2' sees only zero inputs: its weight gradient is zero, its bias gradient is not (32 of 34 zeros).
    by_name = {row.name: row for row in report.layers}
    assert by_name["2"].zero_frac == 32 / 34 and by_name["2"].status == "healthy"
    assert by_name["0"].status == "warning"


def test_dead_layer_one_step_short_of_sustain_is_silent():
    report = train(dead_relu_net(), steps=2, thresholds=Thresholds(sustain=3))
    assert not [f for f in report.findings if f.kind == "dead"], str(report)


def test_the_same_net_with_a_normal_bias_is_silent():
    report = train(dead_relu_net(bias=0.0), steps=3, thresholds=Thresholds(sustain=2))
    assert not [f for f in report.findings if f.kind == "dead"], str(report)


def test_an_embedding_with_few_used_rows_is_not_dead():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 4), nn.Flatten(), nn.Linear(8, 1))
    with run_builders.watched_lookups(model, steps=3, vocab=1000) as mon:
        report = mon.report(thresholds=Thresholds(sustain=2))
        assert mon.history("zero_frac").values[-1, 0] >= 0.99  # it would be judged dead otherwise
    assert not [f for f in report.findings if f.kind == "dead"], str(report)
