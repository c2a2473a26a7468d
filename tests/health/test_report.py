"""Health verdicts on real models: right on clear failures, quiet on healthy training; the same
verdicts on a history its memory budget thinned."""

import dataclasses
import json

import numpy as np
import pytest
import run_builders
import torch
from run_builders import watched_lookups
from torch import nn

import gradscope
from gradscope import Thresholds, demo
from gradscope.health import report as report_module
from gradscope.health.readout import Run
from gradscope.health.report import assess
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats import layout

GRADIENT_KINDS = {"nonfinite", "exploding", "vanishing", "dead", "stalled_updates", "overflow"}


def kinds(report) -> list[str]:
    return [f.kind for f in report.findings]


# --------------------------------------------------------------------------------------
# Healthy training stays quiet
# --------------------------------------------------------------------------------------


def teacher_batch(generator, inputs=16, outputs=4, batch=64):
    x = torch.randn(batch, inputs, generator=generator)
    w = torch.linspace(-1, 1, inputs * outputs).reshape(inputs, outputs)
    return x, torch.tanh(x @ w) + 0.01 * torch.randn(batch, outputs, generator=generator)


@pytest.mark.parametrize("every", [1, 5])
def test_healthy_mlp_with_adam_is_healthy(every):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    with gradscope.watch(model, every=every, optimizer=opt, track_updates=True) as mon:
        for _ in range(400):
            x, y = teacher_batch(g)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
            if mon.step_index % 100 == 0:
                assert mon.report().status == "healthy"
        report = mon.report()
    assert report.status == "healthy", str(report)
    assert not GRADIENT_KINDS & set(kinds(report)), str(report)
    assert all(f.severity == "info" for f in report.findings), str(report)
    assert all(layer.status == "healthy" for layer in report.layers)


@pytest.mark.parametrize("every", [1, 3])
def test_healthy_transformer_with_adam_is_healthy(every):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    with gradscope.watch(model, every=every, optimizer=opt, track_updates=True) as mon:
        for _ in range(300):
            x = torch.randn(16, 6, 32, generator=g)
            target = x.mean(dim=(1, 2), keepdim=True).expand(16, 6, 1) * 5
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
        report = mon.report()
    assert report.status == "healthy", str(report)
    assert not GRADIENT_KINDS & set(kinds(report)), str(report)


def test_empty_monitor_reports_healthy_with_a_note():
    with gradscope.watch(nn.Linear(3, 3)) as mon:
        report = mon.report()
    assert report.status == "healthy" and report.findings == () and report.step == -1
    assert "no steps" in report.note
    assert [layer.status for layer in report.layers] == ["absent"]
    json.loads(report.to_json())


# --------------------------------------------------------------------------------------
# Clear failures are found, in the right layer
# --------------------------------------------------------------------------------------


def train(model, mon, steps, lr=0.0, loss_scale=lambda step: 1.0, batch=32, width=32):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        loss = model(torch.randn(batch, width, generator=g)).square().mean() * loss_scale(step)
        loss.backward()
        mon.step(loss=loss)
        opt.step()
        opt.zero_grad()


def deep_sigmoid(depth=20, width=32):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers)


def test_vanishing_in_a_deep_sigmoid_mlp():
    model = deep_sigmoid()
    with gradscope.watch(model) as mon:
        train(model, mon, steps=3)
        assert "vanishing" not in kinds(mon.report()), "three steps are not sustained"
        train(model, mon, steps=5)
        report = mon.report()
    (finding,) = [f for f in report.findings if f.kind == "vanishing"]
    assert finding.severity == "warning"
    assert finding.layer == "0"  # the layer nearest the input has the smallest gradients
    assert "0" in finding.layers and "38" not in finding.layers
    assert finding.evidence["rms"]["0"] < 1e-5 * finding.evidence["largest_rms"]
    assert report.status == "warning"
    assert {row.name: row.status for row in report.layers}["0"] == "warning"
    assert "initialisation" in finding.suggestion


def test_exploding_with_oversized_initialisation():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(10)])
    with torch.no_grad():
        for layer in model:
            layer.weight.normal_(0, 1.0)  # ~6x too large for width 32
    with gradscope.watch(model) as mon:
        train(model, mon, steps=6)
        report = mon.report()
    finding = next(f for f in report.findings if f.kind == "exploding" and f.layer is not None)
    assert finding.evidence["rms"][finding.layer] > 10
    assert "clip" in finding.suggestion
    assert report.status == "warning"


def test_exploding_spike_and_steady_rise_of_the_total_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    with gradscope.watch(model) as mon:
        train(model, mon, steps=40, loss_scale=lambda step: 1e4 if step == 30 else 1.0)
        report = mon.report()
    spike = next(f for f in report.findings if f.kind == "exploding" and "spiked" in f.message)
    assert spike.step == 30 and spike.evidence["norm"] > 1000 * spike.evidence["running_median"]
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    with gradscope.watch(model) as mon:
        train(model, mon, steps=40, loss_scale=lambda step: 1.3**step)
        report = mon.report()
    assert any(f.kind == "exploding" and "rose steadily" in f.message for f in report.findings), str(report)


def test_dead_layer_behind_a_relu_with_large_negative_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    with gradscope.watch(model) as mon:
        train(model, mon, steps=6)
        report = mon.report()
    dead = [f for f in report.findings if f.kind == "dead"]
    assert [f.layer for f in dead] == ["0"]
    assert dead[0].evidence["zero_frac"] == 1.0
    assert "LeakyReLU" in dead[0].suggestion


def test_embeddings_are_not_dead_by_design():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5000, 8), nn.Flatten(), nn.Linear(16, 1))
    with watched_lookups(model, steps=8, vocab=5000, zero_grad=False) as mon:
        assert "dead" not in kinds(mon.report())
        assert mon.history("zero_frac").values[-1, 0] > 0.99


class NaNGradientAt(torch.autograd.Function):
    """Identity forward; backward returns NaN gradients when ``flag`` is set."""

    @staticmethod
    def forward(ctx, x, flag):
        ctx.flag = flag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (torch.full_like(grad, float("nan")) if ctx.flag else grad), None


class PoisonedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(32, 32)
        self.second = nn.Linear(32, 32)
        self.third = nn.Linear(32, 32)
        self.out = nn.Linear(32, 1)
        self.poison = False

    def forward(self, x):
        x = torch.relu(self.second(torch.relu(self.first(x))))
        x = NaNGradientAt.apply(x, self.poison)  # between 'second' and 'third'
        return self.out(torch.relu(self.third(x)))


@pytest.mark.parametrize("mode", ["backward", "step"])
def test_nonfinite_reports_the_first_layer_upstream_of_the_bad_op(mode):
    torch.manual_seed(0)
    model = PoisonedMLP()
    g = torch.Generator().manual_seed(4)
    with gradscope.watch(model, mode=mode) as mon:
        for step in range(8):
            model.poison = step >= 5
            model(torch.randn(8, 32, generator=g)).square().mean().backward()
            mon.step()
            model.zero_grad()
        report = mon.report()
    assert report.status == "critical"
    finding = report.findings[0]
    assert finding.kind == "nonfinite" and finding.severity == "critical"
    assert report.first_nonfinite == (5, "second")
    assert finding.layers == ("second", "first")  # 'third' and 'out' are downstream: finite
    assert finding.evidence["order"] == ("backward" if mode == "backward" else "model")
    assert finding.evidence["sampled_steps_affected"] == 3


def test_nonfinite_loss_is_critical():
    with gradscope.watch(nn.Linear(2, 1)) as mon:
        for value in (1.0, 0.9, float("nan"), 0.8):
            mon.step(loss=torch.tensor(value))
        report = mon.report()
    finding = next(f for f in report.findings if f.kind == "nonfinite")
    assert finding.layer is None and finding.step == 2 and report.status == "critical"


def test_grad_scaler_skips_are_overflow_not_nonfinite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    g = torch.Generator().manual_seed(5)

    def run(steps, overflow_at):
        for step in range(steps):
            loss = model(torch.randn(8, 32, generator=g)).square().mean()
            if step in overflow_at:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            mon.step()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()

    with gradscope.watch(model, scaler=scaler, optimizer=opt) as mon:
        run(20, overflow_at={3})
        report = mon.report()
        assert "nonfinite" not in kinds(report), str(report)
        (overflow,) = [f for f in report.findings if f.kind == "overflow"]
        assert overflow.severity == "info" and overflow.step == 3
        assert report.status == "healthy"
        run(20, overflow_at=set(range(0, 20, 2)))
        report = mon.report()
        (overflow,) = [f for f in report.findings if f.kind == "overflow"]
        assert overflow.severity == "warning"


@pytest.mark.parametrize(("lr", "side"), [(1e-14, "low"), (1.0, "high")])
def test_stalled_updates(lr, side):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(6)
    with gradscope.watch(model, optimizer=opt, track_updates=True) as mon:
        for _ in range(6):
            model(torch.randn(8, 32, generator=g)).square().mean().backward()
            mon.step()
            opt.step()
            opt.zero_grad()
        report = mon.report()
    stalled = [f for f in report.findings if f.kind == "stalled_updates"]
    assert stalled and stalled[0].evidence["side"] == side, str(report)
    assert "learning rate" in stalled[0].suggestion


# --------------------------------------------------------------------------------------
# The report object
# --------------------------------------------------------------------------------------


def test_report_is_plain_json_readable_and_sorted():
    model = deep_sigmoid(depth=12)
    with gradscope.watch(model) as mon:
        train(model, mon, steps=6)
        mon.step(loss=float("nan"))  # a step without gradients does not interrupt the vanishing run
        report = mon.report()
    data = json.loads(report.to_json())
    assert data["status"] == "critical"
    roots = [f for f in data["findings"] if f["cause"] is None]  # root causes, most severe first
    ranks = [gradscope.health.findings.SEVERITIES.index(f["severity"]) for f in roots]
    assert ranks == sorted(ranks, reverse=True) and len(roots) == len(report.root_causes)
    assert data["layers"][0]["name"] == "0" and len(data["layers"][0]["hist"]) == 64
    text = str(report)
    assert text.startswith("gradscope health: CRITICAL")
    assert "try: " in text and "vanishing" in text and "'0'" in text
    assert report.resources["parameters"] == sum(p.numel() for p in model.parameters())
    assert report.resources["step_time_median_s"] > 0


def test_report_does_not_wait_unless_asked():
    model = deep_sigmoid(depth=3)
    with gradscope.watch(model) as mon:
        train(model, mon, steps=2)
        assert mon.report(wait=True).step == 1


def test_a_failing_check_is_noted_not_raised(monkeypatch):
    from gradscope.health import report as report_module

    def broken(view, thresholds):
        raise ZeroDivisionError("simulated")

    monkeypatch.setattr(report_module, "CHECKS", (broken, *report_module.CHECKS[1:]))
    with gradscope.watch(nn.Linear(2, 1)) as mon:
        mon.step(loss=1.0)
        report = mon.report()
    assert "simulated" in report.note and report.status == "healthy"


def test_loss_starting_at_zero():
    with gradscope.watch(nn.Linear(2, 1)) as mon:
        for step in range(120):
            mon.step(loss=float(step))
        (divergence,) = [f for f in mon.report().findings if f.kind == "divergence"]
    assert divergence.evidence["best"] == 0.0


# --------------------------------------------------------------------------------------
# Causes, non-finite layers and steps in flight, on runs fed record by record
# --------------------------------------------------------------------------------------

NAMES = ("a", "b", "c")


def sampled(step, nans=(0, 0, 0), infs=(0, 0, 0)):
    """A sampled step over ``NAMES``: 10 elements per row, each finite one 0.1."""
    rows = np.zeros((len(NAMES), layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = 10
    rows[:, layout.NANS] = nans
    rows[:, layout.INFS] = infs
    rows[:, layout.SUMSQ] = 0.01 * (10 - rows[:, layout.NANS] - rows[:, layout.INFS])
    rows[:, layout.MAX_ABS] = 0.1
    return records.Sampled(step, rows, np.ones(len(NAMES), dtype=bool), np.array([2, 1, 0]))


def nan_run(steps=100, nan_from=30, bad=(10, 0)):
    """The loss falls from 2.0 by 0.01 a step, then jumps to 3.0 one step after 'b''s gradient
    holds ``bad`` = (NaN, Inf) elements, from ``nan_from`` on."""
    state = run_builders.run_state(NAMES, numel=10)
    for step in range(steps):
        state.apply(records.StepValues(step, {"loss": 3.0 if step > nan_from else 2.0 - step / 100}))
        after = step >= nan_from
        state.apply(sampled(step, nans=(0, bad[0] if after else 0, 0), infs=(0, bad[1] if after else 0, 0)))
    return state


def test_a_consequence_prints_indented_under_its_root():
    report = assess(nan_run(), Thresholds())
    assert [(f.kind, f.cause) for f in report.findings] == [
        ("nonfinite", None),
        ("divergence", {"kind": "nonfinite", "layer": "b", "step": 30}),
    ]
    lines = str(report).splitlines()
    root = next(i for i, line in enumerate(lines) if "] nonfinite" in line)
    assert lines[root].startswith("  [critical] nonfinite in 'b', step 30: ")
    assert lines[root + 1].startswith("      try: ")
    consequence = lines[root + 2]
    assert consequence.startswith("      ↳ [critical] divergence, step 99: the loss jumped at step ")
    assert consequence.endswith(" (a consequence of nonfinite at step 30)")
    assert lines[root + 3].startswith("            try: The loss is rising"), "its own advice, under it"
    assert report.root_causes == report.findings[:1]
    assert report.consequences(report.findings[0]) == report.findings[1:]
    data = json.loads(report.to_json())
    assert data["findings"][1]["cause"] == {"kind": "nonfinite", "layer": "b", "step": 30}


def test_a_consequence_with_the_advice_of_its_root_does_not_repeat_it():
    nan = gradscope.Finding("nonfinite", "critical", "b", 30, 30, "NaN", "lower the learning rate")
    cause = {"kind": "nonfinite", "layer": "b", "step": 30}
    dead = gradscope.Finding("dead", "warning", "c", 99, 40, "zeros", "lower the learning rate", cause=cause)
    report = report_module.HealthReport("critical", (nan, dead), (30, "b"), (), {}, 99)
    lines = str(report).splitlines()[1:]
    assert lines == [
        "  findings, root causes first (most severe first), each followed by its consequences (↳):",
        "  [critical] nonfinite in 'b', step 30: NaN",
        "      try: lower the learning rate",
        "      ↳ [warning] dead in 'c', step 99: zeros (a consequence of nonfinite at step 30)",
    ]


@pytest.mark.parametrize(("bad", "count"), [((10, 0), 10), ((3, 2), 5)])
def test_a_layer_whose_gradient_held_nan_prints_nan_with_its_count(bad, count):
    report = assess(nan_run(steps=40, bad=bad), Thresholds())
    (line,) = [line for line in str(report).splitlines() if line.startswith("  b ")]
    fields = line.split()
    assert fields[3:8] == ["nan", "nan", "nan", "0.0", str(count)], line
    assert "0.00e+00" not in line
    (healthy,) = [line for line in str(report).splitlines() if line.startswith("  a ")]
    assert healthy.split()[3:8] == ["3.16e-01", "1.00e-01", "1.00e-01", "0.0", "0"]
    row = json.loads(report.to_json())["layers"][1]
    finite = 10 - count
    assert row["nonfinite"] == count
    assert row["norm"] == pytest.approx((0.01 * finite) ** 0.5) and row["max_abs"] == 0.1  # the finite elements
    assert report.layers[1].nonfinite == count and report.layers[0].nonfinite == 0


def test_an_absent_layer_has_no_count():
    state = run_builders.run_state(NAMES, numel=10)
    rows = sampled(0).rows
    state.apply(records.Sampled(0, rows, np.array([True, False, True]), np.array([1, -1, 0])))
    report = assess(state, Thresholds())
    assert report.layers[1].status == "absent" and report.layers[1].nonfinite is None
    (line,) = [line for line in str(report).splitlines() if line.startswith("  b ")]
    assert line.split()[3:8] == ["-"] * 5


@pytest.mark.parametrize(
    ("in_flight", "said"),
    [
        ((41,), "statistics of sampled step 41 are still in flight"),
        ((41, 40), "statistics of sampled steps 40-41 are still in flight"),
        ((30, 35, 40), "statistics of sampled steps 30, 35 and 40 are still in flight"),
        (tuple(range(0, 50, 5)), "statistics of 10 sampled steps (0 to 45) are still in flight"),
    ],
)
def test_steps_in_flight_are_named_in_the_note(in_flight, said):
    state = nan_run(steps=20)
    assert assess(state, Thresholds()).note is None
    note = assess(state, Thresholds(), in_flight=in_flight).note
    assert note.startswith(said) and note.endswith("; report(wait=True) waits for them")


def test_steps_in_flight_before_any_step_arrived():
    state = run_builders.run_state(NAMES, numel=10)
    note = assess(state, Thresholds(), in_flight=(0,)).note
    assert note.startswith("no steps have reached the host yet")
    assert "statistics of sampled step 0 are still in flight" in note
    assert assess(state, Thresholds()).note == "no steps recorded yet: nothing to judge"


def test_steps_in_flight_join_the_other_notes(monkeypatch):
    def broken(view, thresholds):
        raise ZeroDivisionError("simulated")

    monkeypatch.setattr(report_module, "CHECKS", (broken, *report_module.CHECKS))
    note = assess(nan_run(steps=20), Thresholds(), in_flight=(20,)).note
    assert note.startswith("checks that failed: test_report: ZeroDivisionError: simulated; statistics of sampled step")


def test_report_passes_the_steps_in_flight_unless_it_waits():
    class Live(Run):
        def _in_flight(self):
            return (19,)

    run = Live(nan_run(steps=19), Thresholds(), closed=False, files=[])
    assert "sampled step 19 are still in flight" in run.report().note
    assert run.report(wait=True).note is None
    assert Run(nan_run(steps=19), Thresholds(), closed=True, files=[]).report().note is None


def test_a_failing_linker_leaves_the_findings_unlinked(monkeypatch):
    def broken(findings, view, thresholds):
        raise RuntimeError("simulated")

    monkeypatch.setattr(report_module, "link", broken)
    report = assess(nan_run(), Thresholds(), in_flight=(100,))
    assert [f.kind for f in report.findings] == ["nonfinite", "divergence"]  # by severity, since_step, check
    assert all(f.cause is None for f in report.findings) and report.status == "critical"
    assert report.note.startswith("linking findings to their causes failed (RuntimeError: simulated)")
    assert "sampled step 100" in report.note
    assert report.first_nonfinite == (30, "b")


def test_the_nan_demo_leads_with_the_nan_and_links_what_it_caused():
    """``gradscope demo --fault nan``: about 10 s of training on CPU."""
    report = demo.run("nan").report()
    first = report.findings[0]
    assert (first.kind, first.layer, first.cause) == ("nonfinite", "blocks.4.linear", None)
    assert report.first_nonfinite == (first.since_step, first.layer)
    (divergence,) = [f for f in report.findings if f.kind == "divergence"]
    assert divergence.cause == {"kind": "nonfinite", "layer": "blocks.4.linear", "step": first.since_step}
    assert divergence in report.consequences(first) and first in report.root_causes
    json.loads(report.to_json())


# --------------------------------------------------------------------------------------
# A history shortened by its memory budget (older sampled steps thinned)
# --------------------------------------------------------------------------------------


def budget_run(history_mib: int, steps: int = 600, rows: int = 50) -> RunState:
    """``rows`` layers over ``steps`` sampled steps, with a histogram every 8: layers 10-14 dead
    throughout, layers 0-9 vanishing from step 560, a NaN in layer 20 at step 590, every
    layer's gradient within [2**-1, 2**0) where it has a histogram (FP8 range)."""
    names = [f"layer{i}" for i in range(rows)]
    info = run_builders.run_info(names, numel=100, history=10_000, hist_history=100)
    state = RunState(dataclasses.replace(info, history_mib=history_mib))
    rng = np.random.default_rng(0)
    for step in range(steps):
        values = np.full((rows, layout.ROW_WIDTH), layout.NO_HISTOGRAM)
        values[:, : layout.HIST] = 0
        values[:, layout.NUMEL] = 100
        grad = 0.1 * (1 + 0.1 * rng.random(rows))
        grad[:10] = 1e-12 if step >= 560 else grad[:10]
        values[:, layout.SUMSQ] = 100 * grad**2
        values[:, layout.MAX_ABS] = 3 * grad
        values[10:15, [layout.ZEROS, layout.SUMSQ, layout.MAX_ABS]] = (100, 0, 0)
        values[20, layout.NANS] = 3 if step == 590 else 0
        if step % 8 == 0:
            values[:, layout.HIST :] = 0
            values[:, layout.HIST + 30] = 100
        state.apply(records.Sampled(step, values, np.ones(rows, dtype=bool), np.arange(rows)[::-1].copy()))
        state.apply(records.StepValues(step, {"loss": 2.0 - step / 1000}))
    return state


def test_a_thinned_history_gives_the_report_of_the_whole_one():
    """The checks read the newest sampled steps, which stay dense: a budget that keeps 178 of
    10 000 sampled-step slots (89 dense, older ones one in 112) and one histogram step gives the
    same report as a history that keeps everything."""
    thinned, whole = budget_run(history_mib=1), budget_run(history_mib=100_000)
    assert thinned.plan.dense < thinned.plan.capacity < 600 and thinned.plan.stride > 1
    assert len(thinned.series("norm")) < len(whole.series("norm")) == 600
    report = assess(thinned, Thresholds())
    assert {"nonfinite", "dead", "vanishing", "fp8_range"} <= set(kinds(report))
    assert report.to_dict() == assess(whole, Thresholds()).to_dict()


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("step_time_median_s", 0.15742747600006624, "157.4 ms"),
        ("step_time_p95_s", 2.5, "2.5 s"),
        ("step_time_p95_s", 3e-5, "30 µs"),
        ("step_time_p95_s", 0.0, "0 s"),
        ("step_time_p95_s", float("nan"), "nan"),
        ("peak_memory_bytes", 3.2e9, "2.98 GiB"),
        ("bytes", 1536, "1.5 KiB"),
        ("bytes", 100, "100 B"),
        ("energy_j", 12345.698, "12.35 kJ"),
        ("energy_per_step_median_j", 0.5, "0.5 J"),
        ("parameters", 1234567, "1,234,567"),
        ("world_size", np.int64(8), "8"),
        ("noise_scale", 1234.5678, "1235"),
        ("note", "text", "text"),
    ],
)
def test_a_resource_is_written_with_its_unit(key, value, shown):
    assert report_module.format_resource(key, value) == shown
