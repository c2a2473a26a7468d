"""The ``rank_desync`` check, fed by the records a DDP monitor emits."""

import numpy as np
from run_builders import run_state

from gradscope import Thresholds
from gradscope.health.report import assess
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats import layout


def _run(world: int) -> RunState:
    state = run_state(
        ("a", "b", "c"),
        numel=(4, 4, 4),
        history=100,
        hist_history=10,
        extra={"distributed": {"kind": "replicated", "world": world, "rank": 0, "global_rank": 0}},
    )
    rows = np.zeros((3, layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = 4
    rows[:, layout.SUMSQ] = 1.0
    for step in range(6):
        state.apply(records.Sampled(step, rows, np.ones(3, bool), np.arange(3)))
    return state


def test_first_desync_names_layers_and_ranks_and_counts_steps():
    state = _run(world=8)
    state.apply(records.Desync(2, (1, 2), (5,)))
    state.apply(records.Desync(4, (1,), (5,)))
    report = assess(state, Thresholds())
    (finding,) = [f for f in report.findings if f.kind == "rank_desync"]
    assert report.status == "critical" and finding.severity == "critical"
    assert finding.layer == "b" and finding.layers == ("b", "c")
    assert finding.since_step == 2 and finding.step == 4
    assert finding.evidence["ranks"] == [5] and finding.evidence["sampled_steps_affected"] == 2
    assert "rank 5 disagree with the majority" in finding.message


def test_no_desync_no_finding():
    report = assess(_run(world=2), Thresholds())
    assert report.status == "healthy"
    assert not [f for f in report.findings if f.kind == "rank_desync"]
    assert report.resources["world_size"] == 2
