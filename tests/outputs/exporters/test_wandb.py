"""W&B export into real offline runs, read back from the runs' own ``.wandb`` files."""

import functools
import math
import random

import numpy as np
import pytest
import torch

import gradscope
from gradscope.stats import layout

pytest.importorskip("wandb", reason="needs the wandb extra")
import wandb
from wandb_records import raw_records, read, run_file

from gradscope.monitor import monitor as monitor_module
from gradscope.outputs.exporters import WandbExporter
from gradscope.outputs.pump import RecordPump

STEPS = 9
SAMPLED = list(range(0, STEPS, 2))  # every=2
W_AND_B_OWN = {"_step", "_runtime", "_timestamp"}


@pytest.fixture(scope="module", autouse=True)
def environment(tmp_path_factory):
    """One torch thread (the machine is shared); W&B's own files under a temporary home."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(home / name.lower()))
        yield
    torch.set_num_threads(threads)


def offline_run(directory, **kwargs):
    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_machine_info=True)
    return wandb.init(mode="offline", dir=directory, project="t", settings=settings, **kwargs)


def flush_every(mp: pytest.MonkeyPatch, seconds: float) -> None:
    """Have exporters flushed by time every ``seconds`` (and at close). A flush ends a W&B row,
    so with a long interval which records share a row does not depend on this machine's speed."""
    mp.setattr(monitor_module, "RecordPump", functools.partial(RecordPump, flush_seconds=seconds))


@pytest.fixture
def flush_at_close(monkeypatch):
    flush_every(monkeypatch, 3600.0)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # three dead units: exact zeros in both layers' gradients
    return model


def layer_vector(module: torch.nn.Module, what: str = "grad") -> np.ndarray:
    """A layer's gradients (or weights) as one float64 vector, as gradscope sees the layer."""
    tensors = [p.grad if what == "grad" else p for p in module.parameters()]
    return torch.cat([t.detach().double().flatten() for t in tensors]).numpy()


def rows_by_step(logged, step_key: str = "gradscope/step") -> dict[int, dict]:
    """The rows that carry ``step_key``, by its value; fails if a step has two rows."""
    by_step = {}
    for row in logged.rows:
        if step_key in row:
            step = row[step_key]
            assert step not in by_step, f"two W&B rows for {step_key} == {step}"
            by_step[step] = row
    return by_step


def check_histogram(hist: dict, grad: np.ndarray) -> None:
    """A ``grad_log2_abs`` histogram against the float64 gradient it describes."""
    assert hist["_type"] == "histogram"
    edges, counts = np.asarray(hist["bins"], dtype=np.float64), np.asarray(hist["values"])
    assert len(edges) == len(counts) + 1
    finite = grad[np.isfinite(grad) & (grad != 0)]
    largest = np.abs(finite).max()
    widths = np.diff(edges)
    assert edges[0] == math.floor(edges[0]) and np.all(widths[:-1] == 1.0)  # one bin per binade
    top = layout.HIST_MIN_EXPONENT + layout.NUM_BINS  # gradscope's last binade ends at 2**16 ...
    if largest >= 2.0**top:  # ... and holds every larger value: the last bin reaches the largest
        assert (edges[-2], edges[-1]) == (top - 1, np.log2(largest))
    else:
        assert widths[-1] == 1.0
    assert counts.sum() == finite.size > 0
    assert counts[0] > 0 and counts[-1] > 0  # from the first non-empty binade to the last
    exponents = np.minimum(np.log2(np.abs(finite)), edges[-1])  # the last bin holds anything above
    expected, _ = np.histogram(exponents, bins=edges)  # (its top edge included)
    assert expected.sum() == finite.size  # nothing fell below the first edge
    assert counts.tolist() == expected.tolist()


# ---- a watched run: scalars, counts, histograms, updates -----------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wandb")
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads, ratios, losses = {}, {}, []
    run = offline_run(directory)
    patch = pytest.MonkeyPatch()
    flush_every(patch, 3600.0)
    try:
        exporter = WandbExporter(histogram_every=2, budget=None)
        # histogram_every=1: every sampled step has histograms, the exporter's own cadence is tested
        with gradscope.watch(
            model, every=2, histogram_every=1, optimizer=opt, track_updates=True, exporters=[exporter]
        ) as mon:
            layers = {row: model.get_submodule(row) for row in mon.rows}
            g = torch.Generator().manual_seed(3)
            for step in range(STEPS):
                loss = model(torch.randn(5, 6, generator=g)).pow(2).mean()
                loss.backward()
                losses.append(loss.item())
                grads[step] = {row: layer_vector(m) for row, m in layers.items()}
                before = {row: layer_vector(m, "weights") for row, m in layers.items()}
                mon.step(loss=loss)
                if step == 2:
                    mon.log(val_loss=1.5)
                opt.step()
                opt.zero_grad()
                ratios[step] = {
                    row: np.linalg.norm(layer_vector(m, "weights") - before[row]) / np.linalg.norm(before[row])
                    for row, m in layers.items()
                }
    finally:
        patch.undo()
        run.finish()
    assert mon.errors == []
    return mon, read(directory), grads, ratios, losses


def test_one_row_per_step_holding_the_monitors_layer_scalars(exported):
    mon, logged, grads, _, _ = exported
    by_step = rows_by_step(logged)
    assert sorted(by_step) == list(range(STEPS))  # the loss makes every step a row, each exactly one
    assert [int(s) for s in mon.history("norm").steps] == SAMPLED
    for field, prefix in [("norm", "grad_norm"), ("rms", "grad_rms"), ("max_abs", "grad_max_abs"),
                          ("zero_frac", "grad_zero_frac")]:  # fmt: skip
        series = mon.history(field)
        for i, step in enumerate(SAMPLED):
            for r, layer in enumerate(mon.rows):
                assert by_step[step][f"{prefix}/{layer}"] == pytest.approx(series.values[i, r], rel=1e-9)
    for step in SAMPLED:  # and the right step's gradient, from the gradient itself
        for layer in mon.rows:
            grad = grads[step][layer]
            assert by_step[step][f"grad_norm/{layer}"] == pytest.approx(np.linalg.norm(grad), rel=1e-6)
            assert by_step[step][f"grad_max_abs/{layer}"] == pytest.approx(np.abs(grad).max(), rel=1e-6)
    for step in set(range(STEPS)) - set(SAMPLED):
        assert not [k for k in by_step[step] if k.startswith(("grad_", "update_ratio/", "fp8_"))]


def test_exact_zero_nan_and_inf_counts(exported):
    mon, logged, grads, _, _ = exported
    by_step = rows_by_step(logged)
    zeros = 0
    for step in SAMPLED:
        for layer in mon.rows:
            grad, row = grads[step][layer], by_step[step]
            assert row[f"grad_zeros/{layer}"] == np.count_nonzero(grad == 0)
            assert row[f"grad_nans/{layer}"] == np.count_nonzero(np.isnan(grad)) == 0
            assert row[f"grad_infs/{layer}"] == np.count_nonzero(np.isinf(grad)) == 0
            assert f"grad_nonfinite/{layer}" not in row  # only written when there are any
            zeros += row[f"grad_zeros/{layer}"]
    assert zeros > 0  # the dead units make the zero counts worth checking


def test_loss_and_metrics_go_under_gradscope(exported):
    mon, logged, _, _, losses = exported
    by_step = rows_by_step(logged)
    loss = mon.history("loss")
    assert [int(s) for s in loss.steps] == list(range(STEPS))
    for step in range(STEPS):
        assert by_step[step]["gradscope/loss"] == pytest.approx(loss.values[step], rel=1e-9)
        assert by_step[step]["gradscope/loss"] == pytest.approx(losses[step], rel=1e-6)
        assert by_step[step]["gradscope/step_time"] > 0
    assert {step: row["gradscope/val_loss"] for step, row in by_step.items() if "gradscope/val_loss" in row} == {2: 1.5}
    keys = set().union(*logged.rows)
    assert not keys & {"loss", "val_loss", "step_time", "peak_memory", "step"}  # never the user's names


def test_histograms_on_every_second_sampled_step_match_the_gradient(exported):
    mon, logged, grads, _, _ = exported
    by_step = rows_by_step(logged)
    written = [step for step in range(STEPS) if any(k.startswith("grad_log2_abs/") for k in by_step[step])]
    assert written == SAMPLED[::2]  # histogram_every=2: sampled steps 0, 4, 8
    for step in written:
        assert {k for k in by_step[step] if k.startswith("grad_log2_abs/")} == {
            f"grad_log2_abs/{layer}" for layer in mon.rows
        }
        for layer in mon.rows:
            check_histogram(by_step[step][f"grad_log2_abs/{layer}"], grads[step][layer])


def test_update_ratios(exported):
    mon, logged, _, ratios, _ = exported
    by_step = rows_by_step(logged)
    series = mon.history("update_ratio")
    assert [int(s) for s in series.steps] == SAMPLED
    for i, step in enumerate(SAMPLED):
        for r, layer in enumerate(mon.rows):
            value = by_step[step][f"update_ratio/{layer}"]
            assert value == pytest.approx(series.values[i, r], rel=1e-9)
            assert value == pytest.approx(ratios[step][layer], rel=1e-5)


def test_every_key_is_charted_against_gradscopes_step(exported):
    _, logged, _, _, _ = exported
    assert {"name": "gradscope/step", "glob_name": "", "step_metric": ""} in logged.metrics
    keys = set().union(*logged.rows) - W_AND_B_OWN - {"gradscope/step"}
    assert {k.split("/")[0] for k in keys} >= {"grad_norm", "grad_zeros", "grad_log2_abs", "update_ratio", "gradscope"}
    for key in keys:
        assert logged.step_metric_of(key) == "gradscope/step", key


# ---- non-finite gradients -------------------------------------------------------------------


def test_nan_inf_and_huge_values_are_counted_and_binned(tmp_path, flush_at_close):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = {}
    run = offline_run(tmp_path)
    try:
        exporter = WandbExporter(histogram_every=1, budget=None)
        with gradscope.watch(model, mode="step", histogram_every=1, exporters=[exporter]) as mon:
            layers = {row: model.get_submodule(row) for row in mon.rows}
            g = torch.Generator().manual_seed(5)
            for step in range(3):
                model(torch.randn(5, 6, generator=g)).pow(2).mean().backward()
                if step == 1:
                    weight = model[2].weight.grad
                    weight[0, 3], weight[1, 4], weight[2, 5] = math.nan, math.inf, -math.inf
                    weight = model[0].weight.grad  # and values in and beyond gradscope's top binade
                    weight[3, 0], weight[4, 1], weight[5, 2] = 2.0**20, -40000.0, 2.0**16
                grads[step] = {row: layer_vector(m) for row, m in layers.items()}
                mon.step()
                if step != 1:
                    opt.step()
                opt.zero_grad()
    finally:
        run.finish()
    assert mon.errors == []
    by_step = rows_by_step(read(tmp_path))
    assert sorted(by_step) == [0, 1, 2]
    for step, row in by_step.items():
        for layer in mon.rows:
            grad = grads[step][layer]
            injected = step == 1 and layer == "2"
            assert row[f"grad_nans/{layer}"] == np.count_nonzero(np.isnan(grad)) == (1 if injected else 0)
            assert row[f"grad_infs/{layer}"] == np.count_nonzero(np.isinf(grad)) == (2 if injected else 0)
            finite = grad[np.isfinite(grad)]
            assert math.isfinite(row[f"grad_norm/{layer}"])
            assert row[f"grad_norm/{layer}"] == pytest.approx(np.linalg.norm(finite), rel=1e-6)
            assert row.get(f"grad_nonfinite/{layer}", 0) == np.count_nonzero(~np.isfinite(grad))
            check_histogram(row[f"grad_log2_abs/{layer}"], grad)
    nans, infs = mon.history("nans"), mon.history("infs")
    assert nans.values[1].tolist() == [0, 1] and infs.values[1].tolist() == [0, 2]


# ---- prefix, the run to log into, frequent flushes ------------------------------------------


def train_briefly(mon, model, steps, log=None):
    g = torch.Generator().manual_seed(7)
    for step in range(steps):
        loss = model(torch.randn(5, 6, generator=g)).pow(2).mean()
        loss.backward()
        mon.step(loss=loss)
        mon.log(val_loss=float(step))
        if log is not None:
            log(step)
        model.zero_grad()


def test_a_prefix_goes_before_every_name_and_the_step_metric(tmp_path, flush_at_close):
    model = tiny_model()
    run = offline_run(tmp_path)
    try:
        with gradscope.watch(model, exporters=[WandbExporter(prefix="m/", budget=None)]) as mon:
            train_briefly(mon, model, 3, log=lambda step: run.log({"loss": 100.0 + step}))  # the user's own
    finally:
        run.finish()
    assert mon.errors == []
    logged = read(tmp_path)
    users = [row for row in logged.rows if "loss" in row]
    assert [row["loss"] for row in users] == [100.0, 101.0, 102.0]
    assert all(set(row) - W_AND_B_OWN == {"loss"} for row in users)
    assert logged.step_metric_of("loss") is None  # gradscope's definitions leave the user's keys alone
    by_step = rows_by_step(logged, "m/gradscope/step")
    assert sorted(by_step) == [0, 1, 2]
    keys = set().union(*by_step.values()) - W_AND_B_OWN
    assert {"m/gradscope/loss", "m/gradscope/val_loss", "m/grad_norm/0", "m/grad_log2_abs/0"} <= keys
    assert all(k.startswith("m/") for k in keys)
    assert {"name": "m/gradscope/step", "glob_name": "", "step_metric": ""} in logged.metrics
    for key in keys - {"m/gradscope/step"}:
        assert logged.step_metric_of(key) == "m/gradscope/step", key
    norm = mon.history("norm")
    for i, step in enumerate(norm.steps):
        assert by_step[int(step)]["m/grad_norm/0"] == pytest.approx(norm.values[i, 0], rel=1e-9)


def test_within_a_budget_every_step_has_the_summary_and_the_layers_come_first_and_with_nans(tmp_path, flush_at_close):
    """``budget=1e-9`` never pays for a layer step: the layers go out only at the first sampled
    step and where the gradients turn non-finite (an input NaN at steps 3-4) or finite again;
    the whole-model summary, against a float64 reference, at every step."""
    model = tiny_model()
    grads = {}
    run = offline_run(tmp_path)
    try:
        with gradscope.watch(model, exporters=[WandbExporter(budget=1e-9)]) as mon:
            g = torch.Generator().manual_seed(5)
            for step in range(8):
                x = torch.randn(5, 6, generator=g)
                if step in (3, 4):
                    x[0, 0] = float("nan")
                model(x).pow(2).mean().backward()
                grads[step] = {row: layer_vector(model.get_submodule(row)) for row in mon.rows}
                mon.step()
                model.zero_grad()
    finally:
        run.finish()
    assert mon.errors == []
    by_step = rows_by_step(read(tmp_path))
    assert sorted(by_step) == list(range(8))
    layer_steps = [step for step, row in by_step.items() if "grad_norm/0" in row]
    assert layer_steps == [0, 3, 5]
    for step, row in by_step.items():
        every = np.concatenate(list(grads[step].values()))
        finite = every[np.isfinite(every)]
        assert row["gradscope/grad_norm"] == pytest.approx(np.sqrt(np.sum(finite**2)), rel=1e-6, abs=1e-30)
        assert row["gradscope/grad_nonfinite"] == np.sum(~np.isfinite(every))
        assert row["gradscope/grad_zero_frac"] == pytest.approx(np.mean(every == 0), rel=1e-12)
    assert by_step[3]["gradscope/grad_nonfinite"] > 0 and by_step[5]["gradscope/grad_nonfinite"] == 0
    for name, vector in grads[3].items():  # the NaN's first step, layer by layer, exactly
        assert by_step[3][f"grad_nans/{name}"] == np.sum(np.isnan(vector)) > 0
        assert by_step[3][f"grad_infs/{name}"] == np.sum(np.isinf(vector))


def test_a_bad_budget_is_refused():
    with pytest.raises(ValueError, match="WandbExporter: budget must be a fraction"):
        WandbExporter(run=object(), budget=0)


def test_a_given_run_is_logged_into_while_another_is_active(tmp_path, flush_at_close):
    (tmp_path / "active").mkdir()
    (tmp_path / "given").mkdir()
    model = tiny_model()
    active = offline_run(tmp_path / "active")
    given = offline_run(tmp_path / "given", reinit="create_new")
    try:
        assert wandb.run is active and WandbExporter().run is active  # the default
        with gradscope.watch(model, exporters=[WandbExporter(run=given, budget=None)]) as mon:
            train_briefly(mon, model, 2, log=lambda step: wandb.log({"other": step}))
    finally:
        given.finish()
        active.finish()
    assert mon.errors == []
    in_given, in_active = read(tmp_path / "given"), read(tmp_path / "active")
    by_step = rows_by_step(in_given)
    assert sorted(by_step) == [0, 1]
    loss = mon.history("loss").values
    assert [by_step[s]["gradscope/loss"] for s in (0, 1)] == pytest.approx(loss.tolist(), rel=1e-9)
    assert in_given.step_metric_of("grad_norm/0") == "gradscope/step"
    assert [set(row) - W_AND_B_OWN for row in in_active.rows] == [{"other"}, {"other"}]
    assert in_active.metrics == []


def test_values_arriving_after_their_step_was_flushed_still_land_on_it(tmp_path, monkeypatch):
    """Flushing after every record splits a step over several rows: each keeps its step."""
    flush_every(monkeypatch, 0.0)
    model = tiny_model()
    run = offline_run(tmp_path)
    try:
        with gradscope.watch(model, exporters=[WandbExporter(histogram_every=0, budget=None)]) as mon:
            train_briefly(mon, model, 3)
    finally:
        run.finish()
    assert mon.errors == []
    logged = read(tmp_path)
    merged = {}
    for row in logged.rows:
        assert "gradscope/step" in row  # no row without its step
        step = merged.setdefault(row["gradscope/step"], {})
        values = {k: v for k, v in row.items() if k not in W_AND_B_OWN | {"gradscope/step"}}
        assert not step.keys() & values.keys()  # no value written twice
        step.update(values)
    assert sorted(merged) == [0, 1, 2]
    assert len(logged.rows) > len(merged)  # the steps were indeed split
    norm, loss = mon.history("norm"), mon.history("loss")
    for step in range(3):
        assert merged[step]["gradscope/val_loss"] == step
        assert merged[step]["gradscope/loss"] == pytest.approx(loss.values[step], rel=1e-9)
        for r, layer in enumerate(mon.rows):
            assert merged[step][f"grad_norm/{layer}"] == pytest.approx(norm.values[step, r], rel=1e-9)
    assert not any(k.startswith("grad_log2_abs/") for k in set().union(*logged.rows))  # histogram_every=0


# ---- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, r"no active W&B run; call wandb\.init"),
        ({"histogram_every": -1}, ValueError, "histogram_every must be"),
        ({"histogram_every": True}, ValueError, "histogram_every must be"),
        ({"histogram_every": 1.5}, ValueError, "histogram_every must be"),
        ({"prefix": 3}, TypeError, "prefix must be a string"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    assert wandb.run is None
    with pytest.raises(error, match=message):
        WandbExporter(**kwargs)


# ---- the reader these tests rely on ---------------------------------------------------------


def test_the_reader_reads_back_what_was_logged(tmp_path):
    rng = random.Random(0)
    texts = ["z" * rng.randrange(1, 300) for _ in range(1500)]
    big = "y" * 100_000  # one record over three 32 KiB blocks: fragments
    run = offline_run(tmp_path)
    try:
        run.define_metric("s")
        run.define_metric("a/*", step_metric="s")
        for i, text in enumerate(texts):
            run.log({"a/x": i / 4, "s": i, "text": big if i == 700 else text})
        run.log({"h": wandb.Histogram(np_histogram=([1, 2, 3], [-2.0, -1.0, 0.0, 1.0]))})
    finally:
        run.finish()
    logged = read(tmp_path)  # first: it waits until W&B's service has written the whole file
    assert max(len(r) for r in raw_records(run_file(tmp_path))) > 2 * 32768
    assert len(logged.rows) == len(texts) + 1
    assert [row["a/x"] for row in logged.rows[:-1]] == [i / 4 for i in range(len(texts))]
    assert [row["text"] for row in logged.rows[:-1]] == [big if i == 700 else t for i, t in enumerate(texts)]
    assert [row["_step"] for row in logged.rows] == list(range(len(texts) + 1))
    assert logged.rows[-1]["h"] == {"_type": "histogram", "values": [1, 2, 3], "bins": [-2, -1, 0, 1]}
    assert logged.metrics == [
        {"name": "s", "glob_name": "", "step_metric": ""},
        {"name": "", "glob_name": "a/*", "step_metric": "s"},
    ]
    assert logged.step_metric_of("a/x") == "s" and logged.step_metric_of("text") is None
