"""``watch(histogram_every=N)``: light rows on most sampled steps, histograms on a cadence and
wherever gradients trigger them, the same on every backend."""

import numpy as np
import pytest
import torch
from models import loss_of, make
from stats_reference import reference_layers

import gradscope
from gradscope.monitor.watched import layer_name

SCALARS = ("numel", "sum", "sumsq", "max_abs", "zeros", "nans", "infs")


BACKENDS = ["numpy", "numba", "triton"]


@pytest.fixture(params=BACKENDS)
def backend_device(request, kernel_device):
    if request.param == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    return request.param, (kernel_device if request.param == "triton" else "cpu")


def train(model, mon, steps, spoil=None, device="cpu"):
    """SGD steps of the MLP; ``spoil(step, model)`` may change gradients before ``mon.step()``
    in step mode. Returns each step's gradients (float64 copies)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_of("mlp", model, step)
        loss.backward()
        if spoil is not None:
            spoil(step, model)
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        mon.step(loss=loss)
        with torch.no_grad():
            opt.step()
            for p in model.parameters():
                p.nan_to_num_(0.0, 0.0, 0.0)
    return grads


def rows_of(grads) -> dict[str, str]:
    return {name: layer_name(name) for name in grads[0]}


def test_histograms_on_the_cadence_light_rows_elsewhere(backend_device):
    backend, device = backend_device
    model = make("mlp").to(device)
    with gradscope.watch(model, every=2, histogram_every=3, backend=backend, mode="step") as mon:
        grads = train(model, mon, steps=14, device=device)
        hist = mon.history("hist")
        assert hist.steps.tolist() == [0, 6, 12]  # one sampled step in 3 (every=2)
        norm = mon.history("norm")
        assert norm.steps.tolist() == list(range(0, 14, 2))
        for step in range(0, 14, 2):
            stats = mon.stats(step)
            expected = reference_layers(grads[step], rows_of(grads))
            assert stats.hist_known.tolist() == [step % 6 == 0] * len(stats), step
            for r, name in enumerate(stats.names):
                ref = expected[name]
                for field in ("numel", "zeros", "nans", "infs", "max_abs"):
                    assert getattr(stats, field)[r] == ref[field], (step, name, field)
                assert abs(stats.sumsq[r] - ref["sumsq"]) <= 1e-5 * ref["sumsq"]
                if stats.hist_known[r]:
                    np.testing.assert_array_equal(stats.hist[r], ref["hist"], err_msg=f"{step} {name}")
                else:
                    assert not stats.hist[r].any()


def test_light_rows_equal_full_rows_in_every_column_but_the_histogram(backend_device):
    """The light statistics are not approximations: bit for bit the full rows' scalars."""
    backend, device = backend_device
    torch.manual_seed(0)
    a, b = make("mlp").to(device), make("mlp").to(device)
    light = gradscope.watch(a, histogram_every=1000, backend=backend, mode="step")
    full = gradscope.watch(b, histogram_every=1, backend=backend, mode="step")
    train(a, light, steps=4, device=device)
    train(b, full, steps=4, device=device)
    for field in SCALARS:
        np.testing.assert_array_equal(light.history(field).values, full.history(field).values, err_msg=field)
    assert light.history("hist").steps.tolist() == [0]
    assert full.history("hist").steps.tolist() == [0, 1, 2, 3]
    light.close()
    full.close()


@pytest.mark.parametrize(
    ("value", "triggers"),
    [
        (float("nan"), True),
        (float("inf"), True),
        (2.0**-70, True),  # tiny: its float32 square underflows
        (2.0**60, True),  # huge
        (2.0**-63, False),  # the rule's bounds: tiny is below 2**-63, huge from 2**56
        (2.0**55, False),
    ],
    ids=["nan", "inf", "tiny", "huge", "at-tiny-bound", "below-huge-bound"],
)
def test_a_gradient_that_triggers_gets_its_histogram_on_a_light_step(backend_device, value, triggers):
    """Parameter rows: the spoiled parameter's row alone gets a histogram, at that step alone."""
    backend, device = backend_device
    model = make("mlp").to(device)
    spoiled = next(iter(model.named_parameters()))[0]

    def spoil(step, model):
        if step == 3:
            with torch.no_grad():
                dict(model.named_parameters())[spoiled].grad.view(-1)[5] = value

    with gradscope.watch(model, histogram_every=100, backend=backend, mode="step", granularity="parameter") as mon:
        grads = train(model, mon, steps=5, spoil=spoil, device=device)
        stats = mon.stats(3)
        known = dict(zip(stats.names, stats.hist_known.tolist(), strict=True))
        assert known == {name: triggers and name == spoiled for name in known}
        if triggers:
            expected = reference_layers(grads[3], {n: n for n in grads[3]})[spoiled]
            np.testing.assert_array_equal(stats.hist[stats.names.index(spoiled)], expected["hist"])
            assert stats.nonfinite[stats.names.index(spoiled)] == (not np.isfinite(value))
        assert not mon.stats(4).hist_known.any()  # the next step is light again
        assert mon.history("hist").steps.tolist() == ([0, 3] if triggers else [0])


def test_a_layer_has_a_histogram_only_if_each_of_its_parameters_has_one(backend_device):
    """A layer's row combines its parameters': a histogram of the weight alone would be a wrong
    count of the layer, so where the bias did not trigger the layer's stays unknown."""
    backend, device = backend_device
    model = make("mlp").to(device)
    weight, bias = [n for n, _ in model.named_parameters()][:2]
    assert layer_name(weight) == layer_name(bias)

    def spoil(step, model):
        with torch.no_grad():
            params = dict(model.named_parameters())
            if step == 1:
                params[weight].grad.view(-1)[0] = float("nan")
            if step == 2:
                params[weight].grad.view(-1)[0] = float("nan")
                params[bias].grad.view(-1)[0] = float("inf")

    with gradscope.watch(model, histogram_every=100, backend=backend, mode="step") as mon:
        train(model, mon, steps=3, spoil=spoil, device=device)
        layer = layer_name(weight)
        for step, expected in ((1, False), (2, True)):
            stats = mon.stats(step)
            known = dict(zip(stats.names, stats.hist_known.tolist(), strict=True))
            assert known == {name: expected and name == layer for name in known}, step
        # the NaN is counted either way, and the report names the layer
        assert any(f.kind == "nonfinite" and f.layer == layer for f in mon.report().findings)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "4"])
def test_histogram_every_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="histogram_every must be a positive integer"):
        gradscope.watch(torch.nn.Linear(2, 2), histogram_every=value)


def test_the_run_log_keeps_light_rows_and_reads_back_the_same_report(tmp_path):
    model = make("mlp")
    with gradscope.watch(model, every=1, histogram_every=4, log_dir=tmp_path / "run") as mon:
        train(model, mon, steps=10)
    run = gradscope.load_run(tmp_path / "run")
    assert run.report().to_dict() == mon.report().to_dict()
    assert run.history("hist").steps.tolist() == [0, 4, 8]
    assert run.info.histogram_every == 4
    for layer in mon.report().layers:
        assert layer.hist_step == 8 and layer.hist is not None
