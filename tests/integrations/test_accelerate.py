"""gradscope in a plain Accelerate loop with gradient accumulation, and the callable form of
``accumulation_steps`` (:class:`gradscope.monitor.hooks.BackwardPasses`) it relies on.

``watch(model, scaler=accelerator.scaler, accumulation_steps=lambda: accelerator.sync_gradients)``
measures the last backward pass of every optimizer step, also of an epoch's shorter last window,
and its numbers equal float64 copies of the gradients taken where ``accelerator.clip_grad_norm_``
has unscaled them and not yet clipped them. On the CPU, accelerate (1.15) gives
``mixed_precision="fp16"`` no GradScaler: the tests give it a real one
(:func:`grad_reference.give_real_grad_scaler`).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from grad_reference import give_real_grad_scaler, grads64, record_after_unscale, row_stats, total_norm

import gradscope
from gradscope.monitor.hooks import BackwardPasses

torch.set_num_threads(1)

MAX_GRAD_NORM = 0.01
SAMPLES, BATCH, ACCUMULATE = 20, 4, 3  # 5 micro-batches an epoch: windows of 3, then 2
WINDOWS = [3, 2, 3, 2]  # micro-batches of each optimizer step over two epochs


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons that refuse a second precision:
    each test starts and ends without them (as accelerate's own tests do)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )


def train(precision: str, accumulation_steps) -> types.SimpleNamespace:
    """Two epochs of the documented Accelerate loop, watched by gradscope.

    ``accumulation_steps``: ``"sync"`` for ``lambda: accelerator.sync_gradients``, or an int.
    """
    accelerator = Accelerator(mixed_precision=precision, cpu=True, gradient_accumulation_steps=ACCUMULATE)
    if precision == "fp16":
        give_real_grad_scaler(accelerator)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(SAMPLES, 6, generator=g), torch.randn(SAMPLES, 1, generator=g))
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, torch.utils.data.DataLoader(data, batch_size=BATCH)
    )
    pre_clip, post_clip, scales, windows = [], [], [], []
    record_after_unscale(accelerator, model, pre_clip, scales)
    last = (lambda: accelerator.sync_gradients) if accumulation_steps == "sync" else accumulation_steps
    mon = gradscope.watch(model, scaler=accelerator.scaler, accumulation_steps=last, backend="numpy")
    passes = 0
    for _ in range(2):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                passes += 1
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                    post_clip.append(grads64(model))
                    mon.step(loss=loss)  # only at optimizer steps: the wrapped optimizer skips the others
                    windows.append(passes)
                    passes = 0
                optimizer.step()
                optimizer.zero_grad()
    mon.close()
    return types.SimpleNamespace(
        accelerator=accelerator, mon=mon, pre_clip=pre_clip, post_clip=post_clip, scales=scales, windows=windows
    )


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sync_gradients_measures_every_window_as_the_unscaled_pre_clip_gradient(precision):
    run = train(precision, "sync")
    mon = run.mon
    assert run.windows == WINDOWS
    assert mon.errors == []
    assert mon.step_index == len(run.pre_clip) == len(WINDOWS)
    reference = row_stats(run.pre_clip, mon.rows)
    assert np.isfinite(reference["norm"]).all()
    for field, rtol in (("norm", 1e-6), ("max_abs", 1e-6), ("zeros", 0)):
        series = mon.history(field)
        np.testing.assert_array_equal(series.steps, np.arange(len(WINDOWS)))
        np.testing.assert_allclose(series.values, reference[field], rtol=rtol, atol=0, err_msg=field)
    pre = np.array([total_norm(g) for g in run.pre_clip])
    post = np.array([total_norm(g) for g in run.post_clip])
    assert (pre > 2 * MAX_GRAD_NORM).all()
    np.testing.assert_allclose(post, MAX_GRAD_NORM, rtol=1e-4)  # clipping happened after gradscope measured
    grad_scale = mon.history("grad_scale").values
    if precision == "fp16":
        assert run.accelerator.scaler is not None and len(set(run.scales)) > 1
        np.testing.assert_array_equal(grad_scale, run.scales)
    else:
        assert run.accelerator.scaler is None
        assert np.isnan(grad_scale).all()


def test_an_int_accumulation_steps_leaves_the_shorter_windows_unmeasured():
    """``accumulation_steps=3`` measures the third pass of a step; a window of two passes has
    none, so its step has no gradient statistics (absent, NaN), never wrong ones."""
    run = train("fp16", ACCUMULATE)
    assert run.windows == WINDOWS
    reference = row_stats(run.pre_clip, run.mon.rows)
    norm = run.mon.history("norm")
    np.testing.assert_array_equal(norm.steps, np.arange(len(WINDOWS)))
    full = [i for i, n in enumerate(WINDOWS) if n == ACCUMULATE]
    short = [i for i, n in enumerate(WINDOWS) if n < ACCUMULATE]
    assert full and short
    np.testing.assert_allclose(norm.values[full], reference["norm"][full], rtol=1e-6)
    assert np.isnan(norm.values[short]).all()
    assert not run.mon.history("present").values[short].any()
    assert run.mon.errors == []


# ---- BackwardPasses with a callable ----------------------------------------------------------


class Answers:
    """A callable ``accumulation_steps`` answering from a list, counting how often it is asked."""

    def __init__(self, *answers: bool) -> None:
        self.answers = list(answers)
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.answers.pop(0)


def run_pass(passes: BackwardPasses, arrivals=()) -> tuple[bool, bool]:
    """One backward pass whose gradients arrive in ``arrivals`` order: (measuring, end())."""
    assert passes.begin() is True
    for index in arrivals:
        assert passes.begin() is False  # later gradients of the same pass
        if passes.measuring:
            passes.arrived(index)
    return passes.measuring, passes.end()


def test_callable_measures_the_pass_it_marks_last():
    answers = Answers(False, False, True)
    passes = BackwardPasses(accumulation_steps=answers, params=3)
    assert run_pass(passes, [2, 1]) == (False, False)
    assert run_pass(passes, [0, 2]) == (False, False)
    np.testing.assert_array_equal(passes.order, [-1, -1, -1])
    assert run_pass(passes, [1, 0, 2]) == (True, True)
    np.testing.assert_array_equal(passes.order, [1, 0, 2])
    assert answers.asked == 3  # once per pass, as it begins: not per gradient


def test_callable_measures_a_shorter_window():
    passes = BackwardPasses(accumulation_steps=Answers(False, True, False, False, True), params=1)
    assert [run_pass(passes)[1] for _ in range(2)] == [False, True]  # a window of two
    passes.reset()
    assert [run_pass(passes)[1] for _ in range(3)] == [False, False, True]  # then of three


def test_callable_measures_only_the_first_pass_it_calls_last_in_a_step():
    passes = BackwardPasses(accumulation_steps=lambda: True, params=2)
    assert run_pass(passes, [1]) == (True, True)
    assert run_pass(passes, [0]) == (False, False)
    assert run_pass(passes, [0, 1]) == (False, False)
    np.testing.assert_array_equal(passes.order, [-1, 0])  # the measured pass's order, untouched since
    passes.reset()
    assert run_pass(passes, [0, 1]) == (True, True)  # a new step measures again
    np.testing.assert_array_equal(passes.order, [0, 1])


def test_a_monitor_measures_the_accumulated_gradient_of_the_pass_the_callable_marks():
    """Three backward passes in one step, the callable marking the second: the statistics are
    of the gradient accumulated over two passes, not over three."""
    model = mlp()
    marks = iter([False, True, False])
    g = torch.Generator().manual_seed(2)
    with gradscope.watch(model, accumulation_steps=lambda: next(marks), backend="numpy") as mon:
        for i in range(3):
            model(torch.randn(4, 6, generator=g)).square().mean().backward()
            if i == 1:
                at_second = grads64(model)
        at_third = grads64(model)
        mon.step()
        norm = mon.history("norm")
    np.testing.assert_allclose(norm.values, row_stats([at_second], mon.rows)["norm"], rtol=1e-6)
    assert not np.allclose(norm.values, row_stats([at_third], mon.rows)["norm"], rtol=1e-3)
