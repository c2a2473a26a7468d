"""The training monitor on real models: numbers, modes, sampling, scaling, robustness."""

import copy
import gc
import os
import warnings
import weakref

import numpy as np
import pytest
import torch
from models import MODELS, loss_of, make
from stats_reference import assert_rows_match, reference_layers, unscaled

import gradscope
from gradscope.monitor import engines, hooks
from gradscope.monitor.watched import layer_name
from gradscope.outputs.exporters.base import Exporter
from gradscope.run import records
from gradscope.stats.reporting import GradscopeWarning

FIELDS = ("numel", "sum", "sumsq", "max_abs", "zeros", "nans", "infs", "hist", "present", "norm")


def snapshot(model: torch.nn.Module) -> dict:
    target = getattr(model, "_orig_mod", model)
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in target.named_parameters()}


def train(name, model, mon, steps, *, lr=0.05, capture=None):
    """Run ``steps`` SGD steps; returns the gradient snapshots taken just before mon.step()."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grads = []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_of(name, model, step)
        loss.backward()
        grads.append(snapshot(model))
        mon.step(loss=loss)
        opt.step()
    return grads


def spare_cores(monkeypatch, worker: bool, hand_over_from: int = 100) -> None:
    """As on a machine whose cores autograd leaves free (``worker``) or not: with them, the CPU
    capture's worker measures gradients of at least ``hand_over_from`` elements as they arrive
    (in these tests' small models, the weights but not the biases) and the others are
    measured together when backward ends."""
    monkeypatch.setattr(engines, "spare_cores", lambda: worker)
    monkeypatch.setattr("gradscope.monitor.capture.HAND_OVER_FROM", hand_over_from)


def history_of(mon) -> dict:
    return {field: mon.history(field) for field in FIELDS}


def check_against_grads(mon, grads, sampled_steps):
    series = history_of(mon)
    assert list(series["norm"].steps) == list(sampled_steps)
    rows = {name: layer_name(name) for name in grads[0]}
    for position, step in enumerate(sampled_steps):
        assert_rows_match(series, position, reference_layers(grads[step], rows))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("mode", "worker"), [("backward", True), ("backward", False), ("step", False)])
def test_numbers_equal_reference_cpu(monkeypatch, name, mode, worker, backend):
    """worker: the large gradients measured on a worker thread during backward (machines with
    spare cores), the others (or all, without spare cores) noted by the cheapest hooks and
    measured together, on all cores, when backward ends; by each CPU kernel."""
    if backend == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    spare_cores(monkeypatch, worker)
    model = make(name)
    with gradscope.watch(model, mode=mode, backend=backend) as mon:
        assert next(iter(mon._engines.captures.values())).overlap is worker
        assert (mon._backward.arrivals is not None) is (mode == "backward")
        assert bool(mon._engines.at_once.any()) is worker and not mon._engines.at_once.all()
        grads = train(name, model, mon, steps=3)
        check_against_grads(mon, grads, [0, 1, 2])


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["backward", "step"])
def test_numbers_equal_reference_triton(kernel_device, name, mode):
    """On the device the kernels read: CPU when interpreted, CUDA when compiled."""
    model = make(name).to(kernel_device)
    with gradscope.watch(model, mode=mode, backend="triton") as mon:
        grads = train(name, model, mon, steps=2)
        check_against_grads(mon, grads, [0, 1])


@pytest.mark.parametrize(("backend", "worker"), [("numpy", True), ("numpy", False), ("numba", True), ("triton", False)])
def test_backward_and_step_modes_give_identical_numbers(monkeypatch, kernel_device, backend, worker):
    """worker: backward mode measures the large gradients on a worker thread as they arrive
    and the rest when backward ends, step mode all of them together; the rows must not
    depend on that."""
    if backend == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    spare_cores(monkeypatch, worker)
    device = kernel_device if backend == "triton" else "cpu"
    a, b = make("transformer").to(device), make("transformer").to(device)
    mon_a = gradscope.watch(a, mode="backward", backend=backend)
    mon_b = gradscope.watch(b, mode="step", backend=backend)
    train("transformer", a, mon_a, steps=3)
    train("transformer", b, mon_b, steps=3)
    for field in ("sum", "sumsq", "max_abs", "zeros", "hist"):
        np.testing.assert_array_equal(mon_a.history(field).values, mon_b.history(field).values, err_msg=field)
    mon_a.close()
    mon_b.close()


def test_every_samples_steps_and_records_loss_every_step():
    model = make("mlp")
    with gradscope.watch(model, every=3) as mon:
        losses = []
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(7):
            opt.zero_grad()
            loss = loss_of("mlp", model, step)
            loss.backward()
            losses.append(loss.item())
            mon.step(loss=loss)
            opt.step()
        assert list(mon.history("norm").steps) == [0, 3, 6]
        loss_series = mon.history("loss")
        assert list(loss_series.steps) == list(range(7))
        np.testing.assert_allclose(loss_series.values, losses, rtol=1e-7)
        assert (mon.history("step_time").values > 0).all()
        assert (mon.history("peak_memory").values > 0).all()


@pytest.mark.parametrize("worker", [True, False])
def test_unsampled_steps_do_no_work(monkeypatch, worker):
    spare_cores(monkeypatch, worker)
    model = make("mlp")
    with gradscope.watch(model, every=5) as mon:
        handed = []  # (step, parameter row) of every gradient handed to a capture
        for capture in mon._engines.captures.values():
            monkeypatch.setattr(capture, "add", lambda index, grad: handed.append((mon.step_index, index)))
            monkeypatch.setattr(
                capture, "add_all", lambda indices, grads: handed.extend((mon.step_index, i) for i in indices)
            )
        train("mlp", model, mon, steps=5)
        assert sorted(handed) == [(0, i) for i in range(6)]  # step 0 only: 3 layers x (weight, bias)


def test_accumulation_measures_the_complete_gradient():
    model = make("mlp")
    k = 3
    with gradscope.watch(model, accumulation_steps=k) as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        grads = []
        for step in range(2):
            opt.zero_grad()
            for micro in range(k):
                (loss_of("mlp", model, 10 * step + micro) / k).backward()
            grads.append(snapshot(model))
            mon.step()
            opt.step()
        check_against_grads(mon, grads, [0, 1])


class TwoBranches(torch.nn.Module):
    """``branch`` takes part only when asked: an expert a router chose in some micro-batches."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(4, 4)
        self.branch = torch.nn.Linear(4, 4)

    def forward(self, x, use_branch: bool):
        h = self.trunk(x)
        return h + self.branch(h) if use_branch else h


@pytest.mark.parametrize("worker", [False, True])
def test_accumulation_measures_a_parameter_that_took_part_only_in_an_earlier_micro_batch(monkeypatch, worker):
    """Backward mode, 3 micro-batches: ``branch`` gets a gradient in the first only. Its
    ``.grad`` at ``mon.step()`` is that gradient, and it is measured (not absent), as the
    trunk's complete gradient is."""
    monkeypatch.setattr(engines, "spare_cores", lambda: worker)  # per-gradient hooks, or Arrivals
    torch.manual_seed(0)
    model = TwoBranches()
    with gradscope.watch(model, accumulation_steps=3, backend="numpy") as mon:
        grads = []
        for step in range(2):
            model.zero_grad()
            for micro in range(3):
                x = torch.randn(5, 4, generator=torch.Generator().manual_seed(10 * step + micro))
                model(x, use_branch=micro == 0).square().mean().backward()
            grads.append(snapshot(model))
            mon.step()
    assert mon.history("present").values.all()
    check_against_grads(mon, grads, [0, 1])


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_grad_scaler_statistics_are_unscaled_and_overflow_steps_skipped(kernel_device, backend):
    device = kernel_device if backend == "triton" else "cpu"  # on a GPU: the CUDA GradScaler
    model = make("mlp").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    with gradscope.watch(model, optimizer=opt, scaler=scaler, backend=backend) as mon:
        expected = []
        for step in range(4):
            opt.zero_grad()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = loss_of("mlp", model, step)
            if step == 2:
                loss = loss * float("inf")  # overflow: the scaler skips this step
            scaler.scale(loss).backward()
            inv = float(1.0 / scaler.get_scale())
            expected.append({n: unscaled(p.grad, inv) for n, p in model.named_parameters()})
            mon.step(loss=loss)
            scaler.step(opt)
            scaler.update()
        series = history_of(mon)
        rows = {name: layer_name(name) for name in expected[0]}
        for position in (0, 1, 3):
            assert_rows_match(series, position, reference_layers(expected[position], rows))
        assert mon.history("nonfinite").values[2].sum() > 0  # the overflowing step, still recorded
        assert list(mon.history("skipped").values) == [False, False, True, False]
        np.testing.assert_array_equal(mon.history("grad_scale").values, [2.0**12, 2.0**12, 2.0**12, 2.0**11])


def test_frozen_and_unused_parameters_are_absent_not_zero():
    model = torch.nn.ModuleDict(
        {"used": torch.nn.Linear(4, 4), "frozen": torch.nn.Linear(4, 4), "unused": torch.nn.Linear(4, 4)}
    )
    model["frozen"].requires_grad_(False)
    with gradscope.watch(model) as mon:
        for _ in range(2):
            model["used"](model["frozen"](torch.randn(3, 4))).sum().backward()
            mon.step()
        present = mon.history("present")
        assert present.rows == ("used", "frozen", "unused")
        np.testing.assert_array_equal(present.values, [[True, False, False]] * 2)
        norm = mon.history("norm").values
        assert np.isnan(norm[:, 1:]).all() and (norm[:, 0] > 0).all()
        assert mon.summary["trainable"] == 40 and mon.summary["parameters"] == 60


@pytest.mark.parametrize("mode", ["backward", "step"])
def test_a_layer_that_took_no_part_in_a_step_is_absent_though_its_grad_holds_zeros(mode):
    """``zero_grad(set_to_none=False)`` leaves zeros in the ``.grad`` of a layer a step does
    not use (an expert no token was routed to): absent in both modes, not a layer of zeros
    (step mode reads ``.grad`` only of the parameters backward gave a gradient in the step)."""
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4)})
    used = [("a", "b"), ("a",), ("b",), ("a",)]
    with gradscope.watch(model, mode=mode) as mon:
        for names in used:
            model.zero_grad(set_to_none=False)
            sum(model[name](torch.randn(3, 4)).sum() for name in names).backward()
            mon.step()
        assert model["b"].weight.grad is not None and not model["b"].weight.grad.any()
        present = mon.history("present")
        np.testing.assert_array_equal(present.values, [[name in names for name in ("a", "b")] for names in used])
        assert mon.history("numel").values[3, 0] == 20 and np.isnan(mon.history("numel").values[3, 1])


def test_step_mode_measures_gradients_set_by_hand():
    """Gradients assigned without a backward pass (computed elsewhere) mark no parameter as
    taking part: then every ``.grad`` counts, as before participation was tracked."""
    model = torch.nn.Linear(4, 4)
    with gradscope.watch(model, mode="step") as mon:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        mon.step()
        np.testing.assert_array_equal(mon.history("present").values, [[True]])
        assert mon.history("sumsq").values[0, 0] == 20


class HalfUsed(torch.nn.Module):
    """One layer whose second parameter only gets a gradient on even steps."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(30))
        self.b = torch.nn.Parameter(torch.randn(30))

    def forward(self, x, use_b):
        return (x * self.a).sum() + ((x * self.b).sum() if use_b else 0)


@pytest.mark.parametrize("backend", ["numpy", "triton"])
@pytest.mark.parametrize("mode", ["backward", "step"])
def test_a_layer_combines_only_the_parameters_that_have_gradients(kernel_device, backend, mode):
    device = kernel_device if backend == "triton" else "cpu"  # the kernels read CUDA tensors on a GPU
    model = HalfUsed().to(device)
    with gradscope.watch(model, backend=backend, mode=mode) as mon:
        grads = []
        for step in range(3):
            model.zero_grad(set_to_none=True)
            model(torch.randn(30, device=device) * (step + 1), use_b=step % 2 == 0).backward()
            grads.append(snapshot(model))
            mon.step()
        assert grads[1]["b"] is None
        check_against_grads(mon, grads, [0, 1, 2])
        np.testing.assert_array_equal(mon.history("numel").values[:, 0], [60, 30, 60])


def test_backward_order_starts_at_the_output():
    model = make("mlp")
    with gradscope.watch(model) as mon:
        train("mlp", model, mon, steps=1)
        order = mon.history("backward_order")
        assert order.rows == ("0", "2", "4")
        np.testing.assert_array_equal(order.values[0], [4, 2, 0])  # two parameters per layer


def test_parameter_granularity_and_selection():
    model = make("mlp")
    with gradscope.watch(model, granularity="parameter", params="2.*") as mon:
        grads = train("mlp", model, mon, steps=1)
        series = history_of(mon)
        assert series["norm"].rows == ("2.weight", "2.bias")
        assert_rows_match(
            series,
            0,
            reference_layers(
                {k: grads[0][k] for k in ("2.weight", "2.bias")}, {"2.weight": "2.weight", "2.bias": "2.bias"}
            ),
        )
    with gradscope.watch(model, params=lambda name, p: p.dim() == 2) as mon:
        assert mon.rows == ("0", "2", "4")
        assert len(mon._watched) == 3


@pytest.mark.parametrize("mode", ["backward", "step"])
def test_sparse_embedding_gradients(mode):
    model = torch.nn.Sequential(torch.nn.Embedding(40, 8, sparse=True), torch.nn.Linear(8, 1))
    with gradscope.watch(model, mode=mode) as mon:
        grads = []
        for step in range(2):
            model.zero_grad(set_to_none=True)
            model(torch.tensor([[1, 5, 5, 30 + step]])).sum().backward()
            assert model[0].weight.grad.is_sparse
            grads.append(snapshot(model))
            mon.step()
        check_against_grads(mon, grads, [0, 1])
        assert mon.history("zero_frac").values[0, 0] == pytest.approx(37 / 40)


def test_tied_parameters_are_counted_once():
    model = make("tied_embedding")
    with gradscope.watch(model) as mon:
        assert mon.rows == ("embed", "mix")
        assert mon.summary["parameters"] == 50 * 16 + 16 * 16 + 16
        grads = train("tied_embedding", model, mon, steps=1)
        check_against_grads(mon, grads, [0])


def test_track_updates_matches_float64_reference():
    model = make("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradscope.watch(model, optimizer=opt, track_updates=True, every=2) as mon:
        expected = {}
        for step in range(4):
            opt.zero_grad()
            loss_of("mlp", model, step).backward()
            mon.step()
            before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            opt.step()
            if step % 2 == 0:
                w2, u2 = {}, {}
                for n, p in model.named_parameters():
                    layer = layer_name(n)
                    w2[layer] = w2.get(layer, 0) + float(before[n].square().sum())
                    u2[layer] = u2.get(layer, 0) + float((p.detach().double() - before[n]).square().sum())
                expected[step] = {layer: (np.sqrt(w2[layer]), np.sqrt(u2[layer])) for layer in w2}
        ratio, weight, update = (mon.history(f) for f in ("update_ratio", "weight_norm", "update_norm"))
        assert list(ratio.steps) == [0, 2]
        for position, step in enumerate(ratio.steps):
            for r, layer in enumerate(ratio.rows):
                w, u = expected[step][layer]
                assert weight.values[position, r] == pytest.approx(w, rel=1e-4)
                assert update.values[position, r] == pytest.approx(u, rel=1e-4)
                assert ratio.values[position, r] == pytest.approx(u / w, rel=1e-4)


def test_metrics_from_step_and_log():
    model = make("mlp")
    with gradscope.watch(model) as mon:
        train("mlp", model, mon, steps=2)
        mon.log(val_loss=0.5, val_accuracy=torch.tensor(0.75))
        mon.step(loss=1.0, lr=torch.tensor(0.01))
        np.testing.assert_array_equal(mon.history("val_loss").values, [np.nan, 0.5, np.nan])
        assert mon.history("val_accuracy").values[1] == 0.75
        assert mon.history("lr").values[2] == pytest.approx(0.01)
        with pytest.raises(ValueError, match="loss must be a scalar"):
            mon.step(loss=torch.ones(3))
        # A metric named like one of gradscope's own fields would hide it: refused, by name.
        with pytest.raises(ValueError, match="'norm' is gradscope's own history field"):
            mon.step(loss=1.0, norm=2.0)
        with pytest.raises(ValueError, match="'loss' is gradscope's own history field"):
            mon.log(loss=0.5)
        assert mon.fields().count("norm") == 1 and mon.fields().count("loss") == 1


def test_history_is_bounded_and_memory_stays_flat():
    import tracemalloc

    model = torch.nn.Linear(3, 1)
    with gradscope.watch(model, every=2, history=4, hist_history=2, histogram_every=1) as mon:
        for _ in range(20):
            model(torch.randn(2, 3)).sum().backward()
            mon.step(loss=0.0)
        assert list(mon.history("norm").steps) == [12, 14, 16, 18]
        assert list(mon.history("hist").steps) == [16, 18]
        assert list(mon.history("loss").steps) == list(range(12, 20))  # history x every steps
        sizes = [a.nbytes for a in vars(mon._run.history).values() if isinstance(a, np.ndarray)]
        tracemalloc.start()
        for step in range(1000):  # every ring slot written at least once
            mon.step(loss=float(step))
        before, _ = tracemalloc.get_traced_memory()
        for step in range(100_000):
            mon.step(loss=float(step), lr=0.1)
        after, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert after - before < 100_000, f"memory grew by {after - before} bytes over 100k steps"
        assert sizes == [a.nbytes for a in vars(mon._run.history).values() if isinstance(a, np.ndarray)]
        assert list(mon.history("loss").steps) == list(range(101_012, 101_020))


def test_thousands_of_parameters():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(1500)])
    with pytest.warns(GradscopeWarning, match="history_mib=512 keeps"):  # 1.3 GB asked: the budget shortens it
        mon = gradscope.watch(model)
    with mon:
        model(torch.randn(4, 2)).sum().backward()
        mon.step()
        assert mon.history("norm").values.shape == (1, 1500)
        assert mon.history("present").values.all()


def test_second_watch_raises_and_close_is_idempotent():
    model = make("mlp")
    mon = gradscope.watch(model)
    with pytest.raises(RuntimeError, match="already watched"):
        gradscope.watch(model)
    with pytest.raises(RuntimeError, match="already watched"):
        gradscope.watch(torch.compile(model))
    mon.close()
    mon.close()
    gradscope.watch(model).close()  # allowed again after close


def test_close_removes_hooks_and_releases_the_model():
    model = make("mlp")
    mon = gradscope.watch(model)
    train("mlp", model, mon, steps=1)
    mon.close()
    hooks = [p._post_accumulate_grad_hooks for p in model.parameters()]
    assert all(not h for h in hooks), "hooks left behind"
    ref = weakref.ref(model)
    del model, hooks
    gc.collect()
    assert ref() is None, "the closed monitor keeps the model alive"
    assert list(mon.history("norm").steps) == [0]  # history outlives the model


def test_a_monitor_dropped_without_close_goes_at_once_and_takes_its_hooks():
    """No reference cycle keeps a monitor alive: dropping the last reference frees it (no
    garbage-collector pass needed) and its finalizer removes the hooks from the model."""
    model = make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    gc.collect()
    gc.disable()
    try:
        mon = gradscope.watch(model, optimizer=opt, scaler=scaler, track_updates=True)
        train("mlp", model, mon, steps=2)
        ref = weakref.ref(mon)
        del mon
        assert ref() is None, "a reference cycle keeps the dropped monitor alive"
    finally:
        gc.enable()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters()), "hooks left behind"
    gradscope.watch(model).close()  # the model is free to be watched again


def test_a_dropped_monitor_takes_every_part_with_it_at_once(tmp_path):
    """The parts hold one another, never the monitor, and form no cycle among themselves:
    with every part built (forward statistics, actions, tracked updates, a run log), dropping
    the monitor frees each part at once, with no garbage-collector pass."""
    model = make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gc.collect()
    gc.disable()
    try:
        mon = gradscope.watch(
            model, optimizer=opt, track_updates=True, forward=True, halt_on="nonfinite", log_dir=tmp_path / "run"
        )
        train("mlp", model, mon, steps=3)
        parts = {
            name: weakref.ref(getattr(mon, name))
            for name in ("_backward", "_recorder", "_failures", "_acting", "_responder", "_run", "_engines", "_forward")
        }
        del mon
        alive = [name for name, ref in parts.items() if ref() is not None]
        assert not alive, f"parts left alive by a reference cycle: {alive}"
    finally:
        gc.enable()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters()), "hooks left behind"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()), "forward hooks left"
    assert records.decode((tmp_path / "run").glob("*.jsonl").__next__().read_text().splitlines()[-1]) == records.Closed(
        3
    )


def _open_files() -> set[str]:
    import os

    fds = "/proc/self/fd"
    if not os.path.isdir(fds):
        pytest.skip("needs /proc to list open files")
    found = set()
    for fd in os.listdir(fds):
        try:
            found.add(os.readlink(os.path.join(fds, fd)))
        except OSError:
            pass
    return found


def test_a_dropped_monitor_takes_its_optimizer_hooks_too():
    """The update tracker and the learning-rate controller hook the optimizer: a monitor dropped
    without close() must not leave them (the tracker's copy of the weights alive, the rate
    still scaled) for as long as the optimizer lives."""
    model = make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooked = (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks))
    mon = gradscope.watch(model, optimizer=opt, track_updates=True, adapt_lr=True)
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) > hooked
    train("mlp", model, mon, steps=2)
    del mon
    gc.collect()
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == hooked
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("worker", [True, False])
def test_dropped_monitors_stop_their_threads_and_close_their_logs(monkeypatch, tmp_path, worker):
    """A monitor dropped without close() shuts down as close() would (as DataLoader's iterator
    stops its workers): no gradscope thread left, every log file closed, and each log ends
    with its closing record giving the steps done."""
    import threading

    spare_cores(monkeypatch, worker)  # worker: a gradscope-capture thread
    before = {t.name for t in threading.enumerate()}
    for i in range(3):
        model = make("mlp")
        mon = gradscope.watch(model, log_dir=tmp_path / f"run{i}")
        train("mlp", model, mon, steps=2 + i)
        assert any(t.name == "gradscope-pump" for t in threading.enumerate())
        assert worker == any(t.name == "gradscope-capture" for t in threading.enumerate())
        del mon, model
    gc.collect()
    left = [t.name for t in threading.enumerate() if t.name.startswith("gradscope-") and t.name not in before]
    assert not [name for name in left if name in ("gradscope-pump", "gradscope-capture")], left
    logs = sorted(tmp_path.glob("run*/*.jsonl"))
    assert len(logs) == 3
    assert not {str(path) for path in logs} & _open_files(), "a log file left open"
    for i, path in enumerate(logs):
        last = records.decode(path.read_text().splitlines()[-1])
        assert last == records.Closed(2 + i), last
        run = gradscope.load_run(path.parent)
        assert run.closed and list(run.history("loss").steps) == list(range(2 + i))


@pytest.mark.parametrize("worker", [True, False])
def test_exception_in_a_hook_never_stops_training(monkeypatch, worker):
    """Whichever way gradients reach the capture: one by one, or together at the pass's end."""
    spare_cores(monkeypatch, worker)
    model = make("mlp")
    with gradscope.watch(model) as mon:
        capture = next(iter(mon._engines.captures.values()))
        for name in ("add", "add_all"):
            original = getattr(capture, name)

            def broken(*args, _original=original):
                if mon.step_index == 1:
                    raise RuntimeError("simulated capture failure")
                return _original(*args)

            monkeypatch.setattr(capture, name, broken)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train("mlp", model, mon, steps=4)
        relevant = [w for w in caught if "monitoring failed" in str(w.message)]
        assert len(relevant) == 1, "the failure is reported once"
        assert list(mon.history("failed").values) == [False, True, False, False]
        assert mon.errors and "simulated capture failure" in mon.errors[0]
        present = mon.history("present").values
        assert not present[1].any(), "a failed step's measurements are not recorded as zeros"
        assert present[2].all()  # later steps are measured again


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_a_failure_on_any_gradient_voids_the_whole_step(monkeypatch, kernel_device, backend):
    """A capture that fails on the third gradient of a step, after two were measured, must not
    leave those two as a (healthy-looking) layer: the whole step reads as absent and failed."""
    spare_cores(monkeypatch, True, hand_over_from=1)  # CPU: every gradient to the worker, one at a time
    device = kernel_device if backend == "triton" else "cpu"
    model = make("mlp").to(device)
    with gradscope.watch(model, backend=backend, granularity="parameter") as mon:
        capture = next(iter(mon._engines.captures.values()))
        calls = []
        original = capture.add

        def third_fails(index, grad):
            if mon.step_index == 1:
                calls.append(index)
                if len(calls) == 3:
                    raise RuntimeError("fails on the third gradient")
            return original(index, grad)

        monkeypatch.setattr(capture, "add", third_fails)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            train("mlp", model, mon, steps=3)
        assert len(calls) >= 3
        assert mon.history("failed").values.tolist() == [False, True, False]
        present = mon.history("present").values
        assert not present[1].any(), "gradients measured before the failure were recorded"
        assert present[0].all() and present[2].all()
        assert np.isnan(mon.history("norm").values[1]).all()
        assert mon.report().layers  # the report still reads


def test_parameters_added_after_watch_are_reported():
    model = make("mlp")
    with gradscope.watch(model) as mon:
        train("mlp", model, mon, steps=1)
        model.append(torch.nn.Linear(4, 4))
        with pytest.warns(RuntimeWarning, match=r"added after watch\(\) are not monitored: 5.weight, 5.bias"):
            train("mlp", model[:5], mon, steps=1)
            mon.step()


def test_compiled_model_gives_the_same_numbers():
    eager = make("mlp")
    compiled_source = copy.deepcopy(eager)
    compiled = torch.compile(compiled_source, backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with gradscope.watch(compiled) as mon_c, gradscope.watch(eager) as mon_e:
        assert mon_c.rows == mon_e.rows == ("0", "2", "4")
        grads = train("mlp", compiled, mon_c, steps=3)
        train("mlp", eager, mon_e, steps=3)
        check_against_grads(mon_c, grads, [0, 1, 2])
        np.testing.assert_allclose(mon_c.history("norm").values, mon_e.history("norm").values, rtol=1e-5)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "every must be a positive integer"),
        ({"accumulation_steps": -1}, "accumulation_steps must be a positive integer"),
        ({"mode": "forward"}, "mode must be one of"),
        ({"track_updates": True}, "track_updates=True needs optimizer="),
        ({"granularity": "neuron"}, "granularity must be"),
        ({"params": "nothing*"}, "no parameters selected"),
        ({"backend": "cupy"}, "backend must be"),
        ({"history": 0}, "history must be a positive integer"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        gradscope.watch(make("mlp"), **kwargs)


def test_step_after_close_is_ignored_with_a_warning():
    model = make("mlp")
    mon = gradscope.watch(model)
    mon.close()
    with pytest.warns(RuntimeWarning, match="after close") as caught:
        mon.step(loss=1.0)
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampoline adds a frame between the two
        assert caught[0].filename == __file__  # the warning points at the user's call, not into gradscope


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["backward", "step"])
def test_no_host_sync_on_cuda(mode):
    model = make("transformer").cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 5, 32, device="cuda")
    y = torch.randint(0, 4, (8,), device="cuda")
    with gradscope.watch(model, mode=mode, optimizer=opt, track_updates=True) as mon:
        for _ in range(2):  # compile kernels and allocate buffers
            torch.nn.functional.cross_entropy(model(x), y).backward()
            mon.step(loss=torch.tensor(0.0, device="cuda"))
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        grads = []
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
                mon.step(loss=loss)
                opt.step()
                opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        series = history_of(mon)
        rows = {name: layer_name(name) for name in grads[0]}
        for position in range(3):
            assert_rows_match(series, 2 + position, reference_layers(grads[position], rows))


# ---- step values between sampled steps ---------------------------------------------------


class StepValuesSeen(Exporter):
    def __init__(self):
        self.losses = []

    def write(self, record):
        if isinstance(record, records.StepValues) and "loss" in record.values:
            self.losses.append((record.step, record.values["loss"]))


def small_steps(mon, model, steps, nan_at=None):
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        loss = model(torch.randn(4, 6, generator=g)).pow(2).mean()
        if step == nan_at:
            loss = loss * float("nan")
        loss.backward()
        losses.append(loss.item())
        mon.step(loss=loss)
        model.zero_grad()
    return losses


def test_between_sampled_steps_every_steps_values_reach_a_reader_and_the_exporters_once_in_order():
    """Values of unsampled steps are recorded in batches (monitor.STEP_BATCH), which no reader sees."""
    from gradscope.monitor import monitor as monitor_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    seen = StepValuesSeen()
    steps = 10 + 2 * monitor_module.STEP_BATCH + 3  # batches that end between sampled steps too
    with gradscope.watch(model, every=100, exporters=[seen]) as mon:
        losses = small_steps(mon, model, 5)
        assert mon.history("loss").steps.tolist() == [0, 1, 2, 3, 4]  # reading takes every step so far
        losses += small_steps(mon, model, steps - 5)
    history = mon.history("loss")
    assert history.steps.tolist() == list(range(steps))
    assert history.values.tolist() == pytest.approx(losses, rel=1e-6)
    assert [step for step, _ in seen.losses] == list(range(steps))
    assert [loss for _, loss in seen.losses] == pytest.approx(losses, rel=1e-6)


def test_a_nan_loss_on_an_unsampled_step_halts_at_that_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    with gradscope.watch(model, every=100, halt_on="nonfinite") as mon:
        with pytest.raises(gradscope.TrainingHalted) as halted:
            small_steps(mon, model, 30, nan_at=13)
    assert mon.step_index == 14 and halted.value.step == 13


@pytest.mark.parametrize("failing", ["Acting", "UpdateTracker", "Recorder"])
def test_a_watch_that_fails_late_leaves_no_hook_thread_or_log_behind(monkeypatch, tmp_path, failing):
    """A part that fails after the backward and forward hooks exist must leave the model as it
    was: no hook, no pump thread, no run log, and the model free to be watched."""
    import threading

    from gradscope.monitor import monitor as monitor_module

    def refuses(*args, **kwargs):
        raise RuntimeError(f"{failing} refused")

    monkeypatch.setattr(monitor_module, failing, refuses)
    model = make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [t for t in threading.enumerate() if t.name == "gradscope-pump"]
    with pytest.raises(RuntimeError, match=f"{failing} refused"):
        gradscope.watch(model, optimizer=opt, track_updates=True, log_dir=tmp_path / "run", forward=True)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters()), "hooks left behind"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert [t for t in threading.enumerate() if t.name == "gradscope-pump"] == before
    assert not (tmp_path / "run").exists()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    monkeypatch.undo()
    gradscope.watch(model, optimizer=opt).close()


class CheckpointedLast(torch.nn.Module):
    """The last layer (the first whose gradient backward produces) runs under reentrant
    activation checkpointing: its gradient arrives inside a nested backward pass, whose end is
    not the end of backward. ``everything``: the whole model is checkpointed (no gradient
    arrives after the nested pass)."""

    def __init__(self, everything: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(4, 4) for _ in range(3))
        self.everything = everything

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        if self.everything:
            return checkpoint(lambda h: self.c(self.b(self.a(h))), x, use_reentrant=True)
        return checkpoint(self.c, self.b(self.a(x)), use_reentrant=True)


@pytest.mark.parametrize("outer_hook", [True, False])
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("everything", [False, True])
@pytest.mark.parametrize(
    ("mode", "worker", "one_by_one"),
    [("backward", False, False), ("backward", True, False), ("backward", False, True), ("step", False, False)],
)
def test_a_reentrant_checkpoint_around_the_last_layer_is_one_pass(
    monkeypatch, mode, worker, one_by_one, everything, micro_batches, outer_hook
):
    """Every layer measured, in every way gradients are taken, with 1 or 2 micro-batches per
    step: a nested pass's end neither ends nor counts as a pass (before, the layers after it
    were absent). ``outer_hook=False``: the post-hook on the outer node cannot be registered;
    the next gradient re-queues the callback, or ``mon.step()`` ends the pass."""
    if not outer_hook:
        if everything and micro_batches > 1 and mode == "backward":
            pytest.skip(
                "known limit of the fallback: with no gradient outside the nested pass, "
                "nothing marks where one micro-batch's backward ends"
            )
        monkeypatch.setattr(hooks, "queue_after_outer_node", lambda callback: False)
    monkeypatch.setattr(engines, "spare_cores", lambda: worker)
    if one_by_one:
        monkeypatch.setattr(engines.Engines, "gathers_at_end", property(lambda self: False))
    torch.manual_seed(0)
    model = CheckpointedLast(everything)
    accumulation = micro_batches if mode == "backward" else 1
    with gradscope.watch(model, mode=mode, accumulation_steps=accumulation, backend="numpy") as mon:
        grads = []
        for step in range(2):
            model.zero_grad()
            for micro in range(micro_batches):
                x = torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * step + micro)).requires_grad_()
                (model(x).square().mean() / micro_batches).backward()
            grads.append(snapshot(model))
            mon.step()
    assert mon.history("present").values.all() and mon.errors == []
    check_against_grads(mon, grads, [0, 1])
