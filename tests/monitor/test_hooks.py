"""Backward-pass hooks (``gradscope.monitor.hooks``): pass counting, hook registration and
removal, the weakly held receiver, arrivals noted (and some handed over at once), the
end-of-backward callback in a real backward, and the participation marks of step mode
(which parameters a real backward gave a gradient)."""

import gc

import numpy as np
import torch

from gradscope.monitor.hooks import (
    Arrivals,
    BackwardPasses,
    GradHook,
    queue_end_of_backward,
    register_grad_hooks,
    register_participation_hooks,
    remove_handles,
)


class Receiver:
    """Stands in for a monitor's backward receiver: records ``on_grad`` calls in a list it
    does not own."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def on_grad(self, index, param) -> None:
        self.calls.append((index, param))


def hooks_of(param: torch.Tensor) -> int:
    return len(param._post_accumulate_grad_hooks or {})


# ---- BackwardPasses ---------------------------------------------------------------------


def run_pass(passes: BackwardPasses, arrivals=()) -> tuple[bool, bool]:
    """One backward pass: (measuring during it, what end() returned)."""
    assert passes.begin() is True
    assert passes.open is True
    for index in arrivals:
        assert passes.begin() is False  # later gradients of the same pass
        if passes.measuring:
            passes.arrived(index)
    measuring = passes.measuring
    return measuring, passes.end()


def test_only_the_last_of_three_passes_is_measured():
    passes = BackwardPasses(accumulation_steps=3, params=4)
    assert (passes.open, passes.measuring, passes.finished) == (False, False, 0)
    assert run_pass(passes, [3, 1]) == (False, False)
    assert run_pass(passes, [2, 0]) == (False, False)
    np.testing.assert_array_equal(passes.order, [-1, -1, -1, -1])  # unmeasured passes leave no order
    assert run_pass(passes, [2, 0, 3]) == (True, True)
    assert passes.finished == 3
    assert (passes.open, passes.measuring) == (False, False)
    np.testing.assert_array_equal(passes.order, [1, -1, 0, 2])
    assert passes.order.dtype == np.int64


def test_a_pass_beyond_accumulation_steps_is_not_measured():
    passes = BackwardPasses(accumulation_steps=2, params=1)
    assert [run_pass(passes)[1] for _ in range(4)] == [False, True, False, False]


def test_every_pass_is_measured_without_accumulation_once_reset():
    passes = BackwardPasses(accumulation_steps=1, params=2)
    assert run_pass(passes, [1]) == (True, True)
    np.testing.assert_array_equal(passes.order, [-1, 0])
    passes.reset()
    assert run_pass(passes, [0, 1]) == (True, True)
    np.testing.assert_array_equal(passes.order, [0, 1])


def test_begin_is_true_only_for_the_first_gradient_of_a_pass():
    passes = BackwardPasses(accumulation_steps=1, params=3)
    assert [passes.begin() for _ in range(3)] == [True, False, False]
    passes.end()
    assert passes.begin() is True


def test_reset_starts_counting_again():
    passes = BackwardPasses(accumulation_steps=3, params=3)
    run_pass(passes)
    run_pass(passes)
    passes.begin()
    passes.arrived(2)
    passes.reset()  # mon.step() in the middle of a pass: everything forgotten
    assert (passes.open, passes.measuring, passes.finished) == (False, False, 0)
    np.testing.assert_array_equal(passes.order, [-1, -1, -1])
    assert run_pass(passes) == (False, False)
    assert run_pass(passes) == (False, False)
    assert run_pass(passes, [1, 0]) == (True, True)
    np.testing.assert_array_equal(passes.order, [1, 0, -1])  # positions start at 0 again


# ---- hooks on parameters ------------------------------------------------------------------


def frozen_middle_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[1].requires_grad_(False)
    return model


def test_hooks_only_on_parameters_that_require_grad_and_removed_again():
    model = frozen_middle_model()
    params = list(model.parameters())
    calls = []
    receiver = Receiver(calls)
    handles = register_grad_hooks(receiver, params)
    assert len(handles) == 4
    assert [hooks_of(p) for p in params] == [1, 1, 0, 0, 1, 1]

    model(torch.randn(2, 3)).sum().backward()
    assert sorted(index for index, _ in calls) == [0, 1, 4, 5]  # indices into params, not handles
    assert all(param is params[index] for index, param in calls)

    remove_handles(handles)
    assert handles == []
    assert [hooks_of(p) for p in params] == [0] * 6
    calls.clear()
    model(torch.randn(2, 3)).sum().backward()
    assert calls == []
    remove_handles(handles)  # idempotent
    assert handles == []


def test_grad_hook_calls_the_receiver_with_its_index():
    calls = []
    receiver = Receiver(calls)
    param = torch.nn.Parameter(torch.ones(2))
    GradHook(receiver, 7)(param)
    assert calls == [(7, param)]


def test_grad_hook_holds_the_receiver_weakly():
    calls = []
    receiver = Receiver(calls)
    model = torch.nn.Linear(2, 1)
    handles = register_grad_hooks(receiver, list(model.parameters()))
    hook = GradHook(receiver, 0)
    del receiver
    gc.collect()
    assert hook.receiver() is None  # the hooks on the model did not keep it alive
    hook(model.weight)  # does nothing, raises nothing
    model(torch.ones(1, 2)).sum().backward()
    assert calls == []
    assert model.weight.grad is not None  # backward itself went on as usual
    remove_handles(handles)


class ArrivalsReceiver:
    """Stands in for a backward receiver of :class:`Arrivals`: records its calls."""

    def __init__(self) -> None:
        self.calls: list = []

    def on_first_arrival(self) -> None:
        self.calls.append(("first", None))

    def on_grad_at_once(self, index, param) -> None:
        self.calls.append(("at once", index))


def test_arrivals_note_every_gradient_and_hand_over_only_those_at_once():
    model = frozen_middle_model()
    params = list(model.parameters())
    at_once = np.array([True, False, True, False, False, True])  # params 2 and 3 are frozen
    receiver = ArrivalsReceiver()
    arrivals = Arrivals(receiver, params, at_once)
    assert [hooks_of(p) for p in params] == [1, 1, 0, 0, 1, 1]
    model(torch.randn(2, 3)).sum().backward()
    assert receiver.calls[0] == ("first", None) and receiver.calls.count(("first", None)) == 1
    handed = [index for kind, index in receiver.calls[1:]]
    assert sorted(handed) == [0, 5]
    indices, grads = arrivals.take()
    assert sorted(indices) == [0, 1, 4, 5]  # every gradient noted, those handed over too
    assert indices.index(5) < indices.index(0) and handed == [5, 0]  # in the order they arrived
    assert all(grad is params[index].grad for index, grad in zip(indices, grads, strict=True))
    assert len(arrivals) == 0
    remove_handles(arrivals.handles)


def test_arrivals_without_at_once_hand_nothing_over():
    model = frozen_middle_model()
    receiver = ArrivalsReceiver()
    arrivals = Arrivals(receiver, list(model.parameters()))
    model(torch.randn(2, 3)).sum().backward()
    assert receiver.calls == [("first", None)]
    assert sorted(arrivals.take()[0]) == [0, 1, 4, 5]
    remove_handles(arrivals.handles)


# ---- participation (step mode) -----------------------------------------------------------


class TwoBranches(torch.nn.Module):
    """Two branches, of which ``forward(x, branch)`` uses one: the other takes no part."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.branches = torch.nn.ModuleList(torch.nn.Linear(3, 2) for _ in range(2))
        self.frozen = torch.nn.Linear(3, 2).requires_grad_(False)

    def forward(self, x, branch):
        return (self.branches[branch](x) + self.frozen(x)).sum()


def test_participation_marks_the_parameters_a_backward_gave_a_gradient():
    model = TwoBranches()
    params = list(model.parameters())  # branches.0 (weight, bias), branches.1, frozen
    passes = BackwardPasses(accumulation_steps=1, params=len(params))
    handles = register_participation_hooks(passes.marks, params)
    assert len(handles) == 4 and [hooks_of(p) for p in params] == [1, 1, 1, 1, 0, 0]
    assert passes.took_part() is None  # nothing marked yet: every .grad would count

    model(torch.randn(4, 3), branch=1).backward()
    assert passes.took_part() == [False, False, True, True, False, False]
    assert passes.marks[2] is params[2]  # the model's own parameter, no tensor made

    passes.reset()
    assert passes.took_part() is None
    model.zero_grad(set_to_none=False)  # branch 1 keeps a zero .grad it gets no part of
    model(torch.randn(4, 3), branch=0).backward()
    assert passes.took_part() == [True, True, False, False, False, False]
    assert params[2].grad is not None and not params[2].grad.any()

    remove_handles(handles)
    assert [hooks_of(p) for p in params] == [0] * 6


def test_participation_in_any_pass_of_an_accumulated_step_counts():
    model = TwoBranches()
    params = list(model.parameters())
    passes = BackwardPasses(accumulation_steps=2, params=len(params))
    handles = register_participation_hooks(passes.marks, params)
    model(torch.randn(4, 3), branch=0).backward()
    model(torch.randn(4, 3), branch=1).backward()
    assert passes.took_part() == [True, True, True, True, False, False]
    remove_handles(handles)


def test_gradients_set_by_hand_mark_nothing():
    """``.grad`` assigned without backward fires no hook: ``took_part()`` is None, and the
    monitor then counts every ``.grad`` (as it did before it tracked participation)."""
    model = TwoBranches()
    params = list(model.parameters())
    passes = BackwardPasses(accumulation_steps=1, params=len(params))
    handles = register_participation_hooks(passes.marks, params)
    for p in params:
        p.grad = torch.ones_like(p)
    assert passes.took_part() is None
    remove_handles(handles)


# ---- end of backward ---------------------------------------------------------------------


def test_queue_end_of_backward_outside_a_backward_returns_false():
    ran = []
    assert queue_end_of_backward(lambda: ran.append(True)) is False
    torch.nn.Linear(2, 1)(torch.ones(1, 2)).sum().backward()  # a later backward does not run it either
    assert ran == []


def test_end_of_backward_callback_runs_after_the_hooks_and_before_backward_returns():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    events = []

    def hook(param):
        events.append(("grad", param.shape))
        if len(events) == 1:
            queued = queue_end_of_backward(lambda: events.append(("end", all_grads_final())))
            events.append(("queued", queued))

    def all_grads_final():
        return all(p.grad is not None for p in model.parameters())

    handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()]
    model(torch.randn(4, 3)).sum().backward()
    events.append(("returned", None))

    kinds = [kind for kind, _ in events]
    assert kinds == ["grad", "queued", "grad", "grad", "grad", "end", "returned"]
    assert events[1] == ("queued", True)
    assert events[-2] == ("end", True)
    remove_handles(handles)
    assert hooks_of(model[0].weight) == 0
