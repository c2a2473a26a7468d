"""The HTML page shows each finding's cause next to its message, and its resources in units."""

import numpy as np
import pytest
import run_builders
import torch
from training_runs import train_monitored

from gradscope import Thresholds
from gradscope.health.readout import Run
from gradscope.run import records
from gradscope.stats import layout

pytest.importorskip("matplotlib", reason="needs the viz extra")
from gradscope.outputs import html_page

NAMES = ("a", "b<i>", "c")


def nan_run(steps=100, nan_from=30):
    """The loss falls from 2.0, then jumps to 3.0 one step after the gradient of 'b<i>' goes NaN."""
    state = run_builders.run_state(NAMES, numel=10)
    for step in range(steps):
        state.apply(records.StepValues(step, {"loss": 3.0 if step > nan_from else 2.0 - step / 100}))
        rows = np.zeros((len(NAMES), layout.ROW_WIDTH))
        rows[:, layout.NUMEL] = 10
        rows[1, layout.NANS] = 10 if step >= nan_from else 0
        rows[:, layout.SUMSQ] = 0.01 * (10 - rows[:, layout.NANS])
        rows[:, layout.MAX_ABS] = 0.1
        state.apply(records.Sampled(step, rows, np.ones(len(NAMES), dtype=bool), np.array([2, 1, 0])))
    return Run(state, Thresholds(), closed=True, files=[])


def test_a_consequence_shows_its_cause():
    run = nan_run()
    report = run.report()
    assert [f.kind for f in report.findings] == ["nonfinite", "divergence"]
    text = html_page.html_report(run, report)
    rows = [row for row in text.split("\n") if row.startswith('<tr class="finding">')]
    assert len(rows) == 2
    assert "consequence" not in rows[0]
    assert '<span class="muted cause">a consequence of nonfinite at step 30</span>' in rows[1]
    assert "b&lt;i&gt;" in rows[0] and "b<i>" not in text.split("<h2>Findings")[1].split("<h2>")[0]


def test_resources_are_written_for_people():
    """Seconds, bytes and joules in a unit with 4 significant digits, counts with separators:
    the values the printed report shows, never a float's repr."""
    summary = {"parameters": 1234567, "trainable": 1234567, "bytes": 4938268, "layers": len(NAMES)}
    state = run_builders.run_state(NAMES, numel=10, summary=summary)
    for step in range(20):
        values = {"loss": 1.0, "step_time": 0.15742747600006624, "peak_memory": 3.2e9, "energy": 617.2849}
        state.apply(records.StepValues(step, values))
    run = Run(state, Thresholds(), closed=True, files=[])
    report = run.report()
    assert report.resources["step_time_median_s"] == 0.15742747600006624
    section = html_page.html_report(run, report).split("<h2>Resources")[1]
    expected = {
        "step_time_median_s": "157.4 ms",
        "step_time_p95_s": "157.4 ms",
        "peak_memory_bytes": "2.98 GiB",
        "energy_j": "12.35 kJ",
        "energy_per_step_median_j": "617.3 J",
        "parameters": "1,234,567",
        "trainable": "1,234,567",
        "bytes": "4.709 MiB",
        "layers": "3",
    }
    for key, shown in expected.items():
        assert f"<tr><td>{key}</td><td>{shown}</td></tr>" in section
        assert f"{key}={shown}" in str(report)  # the printed report shows the same
    assert "0.15742747600006624" not in section and "3200000000" not in section and "12345.6" not in section


def test_the_compression_section_lists_layers_least_important_first(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon, _ = train_monitored(
        model, opt, 3, lambda step: model(torch.randn(16, 6)).square().mean(), optimizer=opt, compression=True
    )
    mon.close()
    report = mon.report()
    page = html_page.html_report(mon, report)
    table = page[page.index('id="compression"') :]
    first, second = report.compression.least_important
    assert table.index(f"<td>{first}</td>") < table.index(f"<td>{second}</td>")
    assert "ready (int8)" in table
