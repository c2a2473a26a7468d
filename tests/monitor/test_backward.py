"""The monitor's side of backward (``gradscope.monitor.backward``): gradients noted by the
cheapest hooks (:class:`~gradscope.monitor.hooks.Arrivals`) and measured when the pass ends,
against gradients handed over one by one, on real models."""

import gc
import warnings

import numpy as np
import pytest
import torch
from models import loss_of, make
from stats_reference import assert_rows_match, reference_layers, unscaled

import gradscope
from gradscope.monitor import engines, hooks
from gradscope.monitor.watched import layer_name

FIELDS = ("numel", "sum", "sumsq", "max_abs", "zeros", "nans", "infs", "hist", "present", "norm")


def watch(model, monkeypatch, at_end: bool, **options):
    """A monitor whose CPU capture measures at the end of each pass (``at_end``) or one
    gradient at a time on a worker (as on machines with spare cores)."""
    monkeypatch.setattr(engines, "spare_cores", lambda: not at_end)
    mon = gradscope.watch(model, **options)
    assert (mon._arrivals is not None) is at_end
    return mon


def layer_reference(grads: dict) -> dict:
    return reference_layers(grads, {name: layer_name(name) for name in grads})


def snapshot(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["mlp", "convnet", "transformer"])
def test_both_ways_give_the_same_numbers_and_the_same_backward_order(monkeypatch, name):
    torch.manual_seed(0)
    model = make(name)
    results = []
    for at_end in (True, False):
        mon = watch(model, monkeypatch, at_end)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the same gradients both times
        for step in range(2):
            opt.zero_grad()
            loss_of(name, model, step).backward()
            mon.step()
        results.append({f: mon.history(f).values for f in (*FIELDS, "backward_order")})
        mon.close()
    for field, values in results[0].items():
        np.testing.assert_array_equal(values, results[1][field], err_msg=field)


def test_accumulation_measures_only_the_last_pass_and_orders_it(monkeypatch):
    model = make("mlp")
    with watch(model, monkeypatch, True, accumulation_steps=3) as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        expected = []
        for step in range(2):
            opt.zero_grad()
            for micro in range(3):
                (loss_of("mlp", model, 10 * step + micro) / 3).backward()
                assert len(mon._arrivals) == 0  # every pass's list is taken (or dropped) at its end
            expected.append(layer_reference(snapshot(model)))
            mon.step()
            opt.step()
        series = {f: mon.history(f) for f in FIELDS}
        for position in (0, 1):
            assert_rows_match(series, position, expected[position])
        np.testing.assert_array_equal(mon.history("backward_order").values[1], [4, 2, 0])


def test_a_pass_whose_end_cannot_be_heard_is_measured_at_step(monkeypatch):
    """Without the engine's end-of-backward callback the pass is measured at ``mon.step()``
    (with one warning); here nothing changes the gradients in between, so the numbers hold."""
    monkeypatch.setattr(hooks, "queue_end_of_backward", lambda callback: False)
    model = make("mlp")
    with watch(model, monkeypatch, True) as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        expected = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                opt.zero_grad()
                loss_of("mlp", model, step).backward()
                expected.append(layer_reference(snapshot(model)))
                mon.step()
                opt.step()
        assert sum("cannot detect the end of backward" in str(w.message) for w in caught) == 1
        series = {f: mon.history(f) for f in FIELDS}
        for position in range(3):
            assert_rows_match(series, position, expected[position])
        assert len(mon._arrivals) == 0


def test_unsampled_steps_leave_nothing_behind(monkeypatch):
    model = make("mlp")
    with watch(model, monkeypatch, True, every=4) as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(6):
            opt.zero_grad()
            loss_of("mlp", model, step).backward()
            assert len(mon._arrivals) == 0, f"step {step}: the pass's arrivals were not let go"
            mon.step()
            opt.step()
        assert list(mon.history("norm").steps) == [0, 4]


def test_grad_scaler_gradients_are_unscaled_by_each_cpu_kernel(monkeypatch):
    pytest.importorskip("numba", reason="numba is not installed")
    for backend in ("numba", "numpy"):
        model = make("mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        with watch(model, monkeypatch, True, optimizer=opt, scaler=scaler, backend=backend) as mon:
            expected = []
            for step in range(2):
                opt.zero_grad()
                scaler.scale(loss_of("mlp", model, step)).backward()
                inv = float(1.0 / scaler.get_scale())
                expected.append(layer_reference({n: unscaled(p.grad, inv) for n, p in model.named_parameters()}))
                mon.step()
                scaler.step(opt)
                scaler.update()
            series = {f: mon.history(f) for f in FIELDS}
            for position in (0, 1):
                assert_rows_match(series, position, expected[position])


def test_the_hooks_do_not_keep_a_dropped_monitor_alive(monkeypatch):
    model = make("mlp")
    mon = watch(model, monkeypatch, True)
    loss_of("mlp", model, 0).backward()
    mon.step()
    del mon
    gc.collect()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    loss_of("mlp", model, 1).backward()  # training goes on without it
