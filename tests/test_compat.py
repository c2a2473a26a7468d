"""What users wrote before the data-flow layout keeps working: old import paths, old run logs."""

import json
from pathlib import Path

import numpy as np

import gradscope

DATA = Path(__file__).resolve().parent / "outputs" / "data"


def test_old_import_paths_are_the_new_objects():
    import gradscope.exporters
    import gradscope.runlog
    import gradscope.visual
    from gradscope.health import readout
    from gradscope.outputs import exporters, html_page, runlog, visual
    from gradscope.run import logfile

    assert gradscope.exporters.Exporter is exporters.Exporter
    assert gradscope.exporters.ScalarExporter is exporters.ScalarExporter
    assert gradscope.exporters.TensorBoardExporter is exporters.TensorBoardExporter
    assert gradscope.exporters.MLflowExporter is exporters.MLflowExporter
    assert gradscope.visual.write_png is visual.write_png
    assert gradscope.visual.write_html is html_page.write_html
    assert gradscope.visual.html_report is html_page.html_report
    assert gradscope.runlog.RunLog is runlog.RunLog
    assert gradscope.runlog.load_run is readout.load_run is gradscope.load_run
    assert gradscope.runlog.RunLogError is logfile.RunLogError is gradscope.RunLogError
    assert gradscope.layout.ROW_WIDTH == 71
    from gradscope.layout import HIST_EDGES, ROW_WIDTH

    from gradscope.stats import layout

    assert HIST_EDGES is layout.HIST_EDGES and ROW_WIDTH == layout.ROW_WIDTH
    assert gradscope.monitor.watch is gradscope.watch


def test_a_run_log_written_before_the_layout_change_gives_the_same_report():
    """A log written by gradscope at commit e76eb21 (a 2-layer model, track_updates, every=2,
    a NaN batch at step 30, val_loss logged) reads back into the report that version printed:
    the same numbers, statuses and problems. What later versions add is checked as such: the
    layers' non-finite counts, and the diagnosis of the NaN — the loss was NaN at the step the
    gradients went NaN, so it was born in the forward pass (the NaN batch), and the NaN
    gradients are its consequence."""
    run = gradscope.load_run(DATA / "run-e76eb21")
    expected = json.loads((DATA / "run-e76eb21-report.json").read_text())
    assert run.closed and run.rows == ("0", "2")
    got = run.report().to_dict()
    for key in ("status", "step", "note", "first_nonfinite", "resources"):
        assert got[key] == expected[key], key
    added = ("nonfinite", "dtype", "fp8_e4m3_zero", "fp8_e5m2_zero", "hist_step")
    assert [{k: v for k, v in layer.items() if k not in added} for layer in got["layers"]] == expected["layers"]
    assert [layer["nonfinite"] for layer in got["layers"]] == [0, 0]  # the NaN step is not the latest
    assert [layer["dtype"] for layer in got["layers"]] == [None, None]  # not recorded in that version
    assert all(layer["fp8_e5m2_zero"] == 0.0 for layer in got["layers"])  # from the logged histograms
    # that version logged a histogram at every sampled step: the layers' newest is the last one
    assert [layer["hist_step"] for layer in got["layers"]] == [int(run.history("norm").steps[-1])] * 2 == [38, 38]
    assert run.info.histogram_every == 1
    problems = {(f["kind"], f["severity"], f["layer"], f["since_step"]) for f in got["findings"]}
    assert problems == {(f["kind"], f["severity"], f["layer"], f["since_step"]) for f in expected["findings"]}
    loss, gradients = got["findings"][:2]
    assert loss["layer"] is None and loss["evidence"]["pass"] == "forward" and loss["cause"] is None
    assert gradients["layer"] == "2" and gradients["cause"] == {"kind": "nonfinite", "layer": None, "step": 30}
    untouched = [f for f in expected["findings"] if f["kind"] != "nonfinite"]
    assert [
        {k: v for k, v in f.items() if k != "cause"} for f in got["findings"] if f["kind"] != "nonfinite"
    ] == untouched
    assert expected["first_nonfinite"] is not None  # the fixture holds the NaN it was made with
    norm = run.history("norm")
    assert list(norm.steps) == list(range(0, 40, 2))
    assert np.isfinite(run.history("update_ratio").values[:10]).all()
