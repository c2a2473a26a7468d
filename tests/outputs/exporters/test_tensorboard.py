"""TensorBoard export, read back with TensorBoard's own event reader."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradscope
from gradscope.stats import layout

pytest.importorskip("tensorboard", reason="needs the tensorboard extra")
from models import TinyTransformer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradscope.outputs.exporters import TensorBoardExporter
from gradscope.outputs.exporters.tensorboard import log2_histogram


def read_events(directory) -> EventAccumulator:
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def train(mon, model, opt, steps):
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        x, y = torch.randn(8, 5, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.step(loss=loss, lr=0.01)
        if step == 2:
            mon.log(val_loss=1.5)
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tb")
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    exporter = TensorBoardExporter(directory, histogram_every=2, budget=None)
    # histogram_every=1: every sampled step has histograms, the exporter's own cadence is tested
    with gradscope.watch(
        model, every=2, histogram_every=1, optimizer=opt, track_updates=True, exporters=[exporter]
    ) as mon:
        train(mon, model, opt, 9)
    return mon, read_events(directory)


def test_per_layer_scalars_equal_the_monitor(exported):
    mon, events = exported
    tags = set(events.Tags()["scalars"])
    for field, prefix in [("norm", "grad_norm"), ("rms", "grad_rms"), ("max_abs", "grad_max_abs"),
                          ("zero_frac", "grad_zero_frac"), ("update_ratio", "update_ratio")]:  # fmt: skip
        series = mon.history(field)
        for r, row in enumerate(mon.rows):
            written = events.Scalars(f"{prefix}/{row}")
            assert f"{prefix}/{row}" in tags
            expected = {int(s): v for s, v in zip(series.steps, series.values[:, r], strict=True) if np.isfinite(v)}
            assert {e.step for e in written} == set(expected)
            for event in written:  # TensorBoard stores float32
                assert event.value == pytest.approx(expected[event.step], rel=1e-6, abs=1e-30)
    assert not any(t.startswith("grad_nonfinite/") for t in tags)  # only written when there are any


def test_loss_metrics_and_resources(exported):
    mon, events = exported
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == list(range(9))
    assert [e.value for e in loss] == pytest.approx(mon.history("loss").values.tolist(), rel=1e-6)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([0.01] * 9)
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(2, 1.5)]
    assert len(events.Scalars("step_time")) == 9
    assert all(e.value > 0 for e in events.Scalars("step_time"))


def test_histograms_come_from_gradscope_binades(exported):
    mon, events = exported
    hist = mon.history("hist")
    max_abs = mon.history("max_abs")
    sampled = [int(s) for s in hist.steps]
    assert sampled == [0, 2, 4, 6, 8]
    for r, row in enumerate(mon.rows):
        written = events.Histograms(f"grad_log2_abs/{row}")
        assert [e.step for e in written] == sampled[::2]  # one sampled step in histogram_every=2
        for event in written:
            i = sampled.index(event.step)
            counts = hist.values[i, r]
            h = event.histogram_value
            assert h.num == counts.sum() > 0
            first = int(np.flatnonzero(counts)[0])
            assert h.bucket_limit[0] == first + layout.HIST_MIN_EXPONENT
            assert h.bucket[0] == 0
            assert list(h.bucket[1:]) == counts[first : first + len(h.bucket) - 1].tolist()
            assert counts[first + len(h.bucket) - 1 :].sum() == 0
            assert h.max == pytest.approx(math.log2(max_abs.values[i, r]))


finite_counts = hnp.arrays(np.int64, (layout.NUM_BINS,), elements=st.integers(0, 10**9))


@given(finite_counts)
def test_log2_histogram_is_exact_in_counts_and_bounds_the_moments(counts):
    nonzero = np.flatnonzero(counts)
    top = int(nonzero[-1]) + layout.HIST_MIN_EXPONENT if len(nonzero) else 0
    hist = log2_histogram(counts, 2.0 ** (top + 0.25))
    if not len(nonzero):
        assert hist is None
        return
    assert hist["num"] == counts.sum()
    assert sum(hist["bucket_counts"]) == counts.sum()
    assert len(hist["bucket_limits"]) == len(hist["bucket_counts"])
    assert np.all(np.diff(hist["bucket_limits"]) == 1.0)  # one bucket per binade
    assert hist["min"] == nonzero[0] + layout.HIST_MIN_EXPONENT
    assert hist["max"] == pytest.approx(top + 0.25)
    # Each element's log2|g| lies in its binade [e, e + 1): the midpoint sum is within num/2.
    exponents = np.arange(layout.NUM_BINS) + layout.HIST_MIN_EXPONENT
    low = float(counts @ exponents)
    assert low <= hist["sum"] <= low + counts.sum()


def test_values_beyond_the_top_binade_widen_the_last_bucket():
    counts = np.zeros(layout.NUM_BINS, np.int64)
    counts[-1] = 3
    hist = log2_histogram(counts, 2.0**20)
    assert hist["bucket_limits"][-1] == 20.0 and hist["max"] == 20.0


def test_a_users_writer_is_flushed_not_closed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path)
    model = torch.nn.Linear(4, 2)
    with gradscope.watch(model, exporters=[TensorBoardExporter(writer=writer, prefix="gs/", budget=None)]) as mon:
        for _ in range(3):
            loss = model(torch.randn(5, 4)).pow(2).mean()
            loss.backward()
            mon.step(loss=loss)
    writer.add_scalar("after", 1.0, 0)  # still open
    writer.close()
    tags = read_events(tmp_path).Tags()
    assert {"gs/loss", "gs/grad_norm/(root)", "after"} <= set(tags["scalars"])
    assert "gs/grad_log2_abs/(root)" in tags["histograms"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give a log_dir or a writer"),
        ({"log_dir": "x", "histogram_every": -1}, "histogram_every must be"),
        ({"log_dir": "x", "budget": 1.5}, "TensorBoardExporter: budget must be a fraction"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TensorBoardExporter(**kwargs)


def test_the_controllers_changes_reach_tensorboard(tmp_path):
    """A loss spike makes the learning-rate controller halve the rate: TensorBoard gets the scale."""
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    exporter = TensorBoardExporter(tmp_path, histogram_every=0, budget=None)
    adapt = gradscope.AdaptiveLR(on=("loss_spike",))
    with gradscope.watch(model, optimizer=opt, adapt_lr=adapt, exporters=[exporter]) as mon:
        g = torch.Generator().manual_seed(3)
        for step in range(30):
            x, y = torch.randn(8, 5, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            mon.step(loss=50.0 if step == 20 else 1.0 + 0.01 * (step % 3))  # the reported loss spikes once
            opt.step()
            opt.zero_grad()
    (change,) = mon.report().actions
    assert [(e.step, e.value) for e in read_events(tmp_path).Scalars("lr_scale")] == [(change["step"], 0.5)]
    assert change["step"] == 20


def test_histograms_follow_the_monitors_cadence_and_its_triggered_rows(tmp_path):
    """With the defaults (exporter: every step that has histograms; monitor: one sampled step in
    ``histogram_every``, and rows that trigger one), histograms are written exactly where the
    monitor computed them, never for a light row."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    exporter = TensorBoardExporter(tmp_path, budget=None)
    with gradscope.watch(model, histogram_every=3, granularity="parameter", mode="step", exporters=[exporter]) as mon:
        for step in range(7):
            model(torch.randn(5, 4)).square().mean().backward()
            if step == 4:  # a NaN in one gradient: that parameter's histogram is computed
                model[2].weight.grad[0, 0] = math.nan
            mon.step()
            opt.zero_grad()
    events = read_events(tmp_path)
    hist = mon.history("hist")
    assert hist.steps.tolist() == [0, 3, 4, 6]
    for r, row in enumerate(mon.rows):
        written = [e.step for e in events.Histograms(f"grad_log2_abs/{row}")]
        assert written == ([0, 3, 4, 6] if row == "2.weight" else [0, 3, 6]), row
        for event in events.Histograms(f"grad_log2_abs/{row}"):
            counts = hist.values[hist.steps.tolist().index(event.step), r]
            assert event.histogram_value.num == np.nansum(counts) > 0
