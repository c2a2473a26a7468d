"""The monitor's side of backward (``gradscope.monitor.backward``): gradients noted by the
cheapest hooks (:class:`~gradscope.monitor.hooks.Arrivals`) and measured when the pass ends,
against gradients handed over one by one, on real models; and the receiver built alone,
with real engines on a tiny model and the parts it is given."""

import gc
import threading
import warnings
import weakref

import numpy as np
import pytest
import torch
from models import loss_of, make
from stats_reference import assert_rows_match, reference_layers, reference_row, unscaled
from torch import nn

import gradscope
from gradscope.distributed.topology import Topology
from gradscope.monitor import capture, engines, hooks
from gradscope.monitor.backward import BackwardReceiver
from gradscope.monitor.failures import Failures
from gradscope.monitor.schedule import OpenStep
from gradscope.monitor.watched import layer_name
from gradscope.run import records
from gradscope.stats import layout
from gradscope.stats.reporting import GradscopeWarning

FIELDS = ("numel", "sum", "sumsq", "max_abs", "zeros", "nans", "infs", "hist", "present", "norm")


WAYS = ("at_end", "worker", "one_by_one")
"""How gradients reach a CPU capture: all noted by the cheapest hooks and measured when the
pass ends (no spare cores); the same, but the large ones also handed to a worker as they
arrive (spare cores); every one handed over by its own hook (the way of the Triton captures,
DDP and rows combined across ranks), the large ones measured by the worker."""


def use_way(monkeypatch, way: str, hand_over_from: int) -> None:
    """Make the engines built next take gradients the ``way`` named (:data:`WAYS`), with
    gradients of at least ``hand_over_from`` elements counting as large."""
    monkeypatch.setattr(engines, "spare_cores", lambda: way != "at_end")
    monkeypatch.setattr(capture, "HAND_OVER_FROM", hand_over_from)
    if way == "one_by_one":
        monkeypatch.setattr(engines.Engines, "gathers_at_end", property(lambda self: False))


def check_way(receiver: BackwardReceiver, engines_: engines.Engines, way: str) -> None:
    """The receiver's hooks are those of ``way``; with a worker, some parameters (not all) are large."""
    assert (receiver.arrivals is not None) is (way != "one_by_one")
    if way != "one_by_one":
        assert bool(engines_.at_once.any()) is (way == "worker") and not engines_.at_once.all()


def watch(model, monkeypatch, way: str = "at_end", **options):
    """A monitor whose CPU capture takes gradients the ``way`` named (:data:`WAYS`); large
    gradients: 100 elements or more (these models' weights, not their biases)."""
    use_way(monkeypatch, way, hand_over_from=100)
    mon = gradscope.watch(model, **options)
    check_way(mon._backward, mon._engines, way)
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
    for way in WAYS:
        mon = watch(model, monkeypatch, way)
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
    with watch(model, monkeypatch, "at_end", accumulation_steps=3) as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        expected = []
        for step in range(2):
            opt.zero_grad()
            for micro in range(3):
                (loss_of("mlp", model, 10 * step + micro) / 3).backward()
                assert len(mon._backward.arrivals) == 0  # every pass's list is taken (or dropped) at its end
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
    with watch(model, monkeypatch, "at_end") as mon:
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
        assert len(mon._backward.arrivals) == 0


def test_unsampled_steps_leave_nothing_behind(monkeypatch):
    model = make("mlp")
    with watch(model, monkeypatch, "at_end", every=4) as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(6):
            opt.zero_grad()
            loss_of("mlp", model, step).backward()
            assert len(mon._backward.arrivals) == 0, f"step {step}: the pass's arrivals were not let go"
            mon.step()
            opt.step()
        assert list(mon.history("norm").steps) == [0, 4]


@pytest.mark.parametrize("way", WAYS)
def test_grad_scaler_gradients_are_unscaled_by_each_cpu_kernel(monkeypatch, way):
    pytest.importorskip("numba", reason="numba is not installed")
    for backend in ("numba", "numpy"):
        model = make("mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        with watch(model, monkeypatch, way, optimizer=opt, scaler=scaler, backend=backend) as mon:
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
    mon = watch(model, monkeypatch, "at_end")
    loss_of("mlp", model, 0).backward()
    mon.step()
    del mon
    gc.collect()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    loss_of("mlp", model, 1).backward()  # training goes on without it


# ---- the receiver alone: real engines, a tiny model, no monitor ---------------------------


SINGLE = Topology("single")


class Receiving:
    """A :class:`BackwardReceiver` built alone, with the parts it is given: real NumPy
    engines over a tiny model's parameters, a pass counter, an open step, and failures whose
    ``Failed`` records go to a list."""

    def __init__(
        self,
        monkeypatch,
        way: str = "at_end",
        every: int = 1,
        accumulation_steps: int = 1,
        mode: str = "backward",
        topology: Topology = SINGLE,
    ) -> None:
        use_way(monkeypatch, way, hand_over_from=20)  # large: the weights (32, 24 elements), not the biases
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.params = tuple(self.model.parameters())
        self.engines = engines.Engines(self.params, "numpy", mode, Topology("single"), lambda key: None)
        self.passes = hooks.BackwardPasses(accumulation_steps, len(self.params))
        self.open = OpenStep(every, 1)
        self.emitted: list = []
        self.failures = Failures(every, True, self.emitted.append)
        self.receiver = BackwardReceiver(
            self.params, self.engines, self.passes, self.open, self.failures, threading.RLock(), mode, topology
        )
        if mode == "backward":
            check_way(self.receiver, self.engines, way)
        else:
            assert self.receiver.arrivals is None  # step mode: participation hooks only

    def backward(self, seed: int) -> None:
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
        self.model.zero_grad()
        self.model(x).square().mean().backward()

    def finished_rows(self, step: int) -> np.ndarray:
        """The open step's per-parameter rows, once its capture finished."""
        self.receiver.close_open_pass()
        assert self.engines.finish(step, failed=self.failures.is_void(step)) == []
        completed = self.engines.completed(block=True)
        assert [s for s, _, _ in completed] == [step]
        rows, _, _ = self.engines.param_rows({key: payload for _, key, payload in completed})
        return rows

    def next_step(self) -> None:
        self.passes.reset()
        self.engines.reset()
        self.open.move_to(self.open.index + 1)


@pytest.fixture
def receiving(monkeypatch):
    """Builds :class:`Receiving` parts; their engines are closed after the test (a capture
    worker thread must not outlive it)."""
    built = []

    def build(**kwargs) -> Receiving:
        built.append(Receiving(monkeypatch, **kwargs))
        return built[-1]

    yield build
    for part in built:
        part.engines.close()


@pytest.mark.parametrize("way", WAYS)
def test_a_receiver_hands_every_final_gradient_to_its_engines(receiving, way):
    """Per gradient or at the pass's end: every parameter's gradient reaches its capture, in
    the order it became final (the output layer first), with the reference's statistics."""
    part = receiving(way=way)
    part.backward(0)
    assert part.engines.present.all()
    order = part.passes.order  # per parameter: first Linear's weight and bias, then the last's
    assert sorted(order) == [0, 1, 2, 3] and max(order[2:]) < min(order[:2])
    rows = part.finished_rows(0)
    for index, p in enumerate(part.params):
        expected = reference_row(p.grad)
        assert rows[index, layout.NUMEL] == expected["numel"]
        assert rows[index, layout.MAX_ABS] == expected["max_abs"]
        np.testing.assert_allclose(rows[index, layout.SUMSQ], expected["sumsq"], rtol=1e-6)
        np.testing.assert_array_equal(rows[index, layout.HIST :], expected["hist"])
    assert part.emitted == [] and part.failures.errors == []


@pytest.mark.parametrize("way", WAYS)
def test_a_receiver_ignores_unsampled_steps_and_all_but_the_last_pass(receiving, way):
    part = receiving(way=way, every=2, accumulation_steps=2)
    part.backward(0)  # step 0, first of two passes: not measured
    assert not part.engines.present.any() and part.passes.finished == 1
    part.backward(1)
    assert part.engines.present.all()
    part.finished_rows(0)
    part.next_step()  # step 1: unsampled, the hooks return at once
    part.backward(2)
    part.backward(3)
    assert not part.engines.present.any() and (part.passes.order == -1).all()
    if part.receiver.arrivals is not None:
        assert len(part.receiver.arrivals) == 0, "an unsampled pass's arrivals are let go at its end"


@pytest.mark.parametrize("way", WAYS)
def test_a_failure_in_a_hook_voids_the_open_step_through_failures(monkeypatch, receiving, way):
    part = receiving(way=way)
    part.open.move_to(4)
    failing = next(iter(part.engines.captures.values()))
    at_end = way == "at_end"
    monkeypatch.setattr(failing, "add_all" if at_end else "add", lambda *args: (_ for _ in ()).throw(OSError("no")))
    with pytest.warns(GradscopeWarning, match=r"monitoring failed at step 4 \(OSError: no\)"):
        part.backward(0)  # training goes on
    assert part.emitted == [records.Failed(4)] and part.failures.is_void(4)
    assert part.failures.errors == ["step 4: OSError: no"]
    if not at_end:
        assert part.engines.present.sum() == 0, "after the failure no gradient of the step is handed over"


def test_with_a_worker_large_gradients_are_handed_over_during_the_pass_and_the_rest_at_its_end(monkeypatch, receiving):
    """The weights (large here) reach the capture one by one while backward runs; the biases
    are gathered when it ends, without the weights again; the order covers all four."""
    part = receiving(way="worker")
    capture_ = next(iter(part.engines.captures.values()))
    handed: list = []  # (how, indices, whether the pass was still running)
    add, add_all = capture_.add, capture_.add_all

    def spy_add(index, grad):
        handed.append(("add", [index], part.passes.open))
        add(index, grad)

    def spy_add_all(indices, grads):
        handed.append(("add_all", list(indices), part.passes.open))
        add_all(indices, grads)

    monkeypatch.setattr(capture_, "add", spy_add)
    monkeypatch.setattr(capture_, "add_all", spy_add_all)
    part.backward(0)
    assert sorted(handed[:2]) == [("add", [0], True), ("add", [2], True)]  # weights: output layer's first
    assert handed[0][1] == [2]
    order = part.passes.order
    assert sorted(order) == [0, 1, 2, 3] and max(order[2:]) < min(order[:2])  # output layer first
    assert handed[2:] == [("add_all", sorted([1, 3], key=lambda i: order[i]), False)]  # biases, in arrival order
    rows = part.finished_rows(0)
    for index, p in enumerate(part.params):
        np.testing.assert_array_equal(rows[index, layout.HIST :], reference_row(p.grad)["hist"])


def test_hooks_hold_the_receiver_weakly_and_a_closed_receiver_does_nothing(receiving):
    part = receiving(way="worker")
    part.receiver.close()
    part.backward(0)
    assert not part.engines.present.any()
    gc.collect()
    gc.disable()
    try:
        ref = weakref.ref(part.receiver)
        del part.receiver
        assert ref() is None, "the model's hooks keep the receiver alive"
    finally:
        gc.enable()
    part.backward(1)  # hooks left on the model find nothing and do nothing
    assert not part.engines.present.any()


# ---- step mode: which parameters took part in the step -----------------------------------


def test_in_step_mode_a_single_process_marks_which_parameters_took_part(receiving):
    """Step mode measures at ``mon.step()``; its hooks only mark participation, and the
    engines then read ``.grad`` only of parameters that took part: a layer cut off from the
    loss keeps the zeros of ``zero_grad(set_to_none=False)`` but is absent, not measured."""
    part = receiving(mode="step")
    assert len(part.receiver.handles) == 4 and part.receiver.arrivals is None
    part.backward(0)  # a step in which every parameter took part
    assert part.passes.took_part() == [True] * 4
    part.next_step()
    part.model.zero_grad(set_to_none=False)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    part.model[0](x).square().mean().backward()  # only the first Linear takes part
    assert part.passes.took_part() == [True, True, False, False]
    assert part.params[2].grad is not None and not part.params[2].grad.any()
    part.engines.add_all(part.params, part.passes.took_part())
    np.testing.assert_array_equal(part.engines.present, [True, True, False, False])
    rows = part.finished_rows(1)
    assert rows[0, layout.NUMEL] == 32 and rows[2, layout.NUMEL] == 0  # nothing measured for it
    part.next_step()
    assert part.passes.took_part() is None, "each step starts unmarked"
    part.receiver.close()
    assert part.passes.marks == [None] * 4, "a closed receiver holds no parameter"


@pytest.mark.parametrize(
    "topology", [Topology("replicated", world=2), Topology("sharded", world=2), Topology("single", world=2)]
)
def test_in_step_mode_a_distributed_run_counts_every_grad(receiving, topology):
    """Another rank's gradient may reach a parameter this rank's backward did not touch: no
    participation hooks, ``took_part()`` is None and every ``.grad`` counts."""
    part = receiving(mode="step", topology=topology)
    assert part.receiver.handles == []
    part.backward(0)
    assert part.passes.took_part() is None
