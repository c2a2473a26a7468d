"""Update tracking (``gradscope.monitor.updates.UpdateTracker``) around a real ``optimizer.step()``.

Per-parameter ``||w_before||**2`` and ``||w_after - w_before||**2`` on sampled steps against
float64 references computed here, nothing on unsampled steps, half-precision parameters
measured in float32 or better, the optimizer hooks removed by ``close()``, and errors kept
in ``.error`` instead of reaching training.
"""

import gc

import numpy as np
import pytest
import torch

from gradscope.monitor.updates import UpdateTracker


class Sampler:
    """Stands in for the monitor: ``sampled_step`` answers the step set in ``answer``."""

    def __init__(self, answer=0) -> None:
        self.answer = answer
        self.asked = 0

    def sampled_step(self):
        self.asked += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def tiny_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(dtype)


def set_grads(model, seed: int) -> None:
    """Gradients set directly (no forward pass): deterministic, and fine for any dtype on CPU."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def step_with_reference(model, optimizer, seed: int):
    """One optimizer step; returns float64 (weight_sq, update_sq) per parameter, computed here."""
    set_grads(model, seed)
    before = [p.detach().to(torch.float64).clone() for p in model.parameters()]
    optimizer.step()
    after = [p.detach().to(torch.float64) for p in model.parameters()]
    weight_sq = np.array([float((b * b).sum()) for b in before])
    update_sq = np.array([float(((a - b) ** 2).sum()) for a, b in zip(after, before, strict=True)])
    return weight_sq, update_sq


def test_sampled_steps_record_weight_and_update_norms():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = Sampler(answer=0)
    tracker = UpdateTracker(optimizer, list(model.parameters()), sampler.sampled_step)
    expected = {}
    for step in range(3):
        sampler.answer = step * 10
        expected[step * 10] = step_with_reference(model, optimizer, seed=step)
    done = tracker.completed()
    assert [step for step, _, _ in done] == [0, 10, 20]
    for step, weight_sq, update_sq in done:
        assert weight_sq.dtype == update_sq.dtype == np.float64
        assert weight_sq.shape == update_sq.shape == (4,)
        np.testing.assert_allclose(weight_sq, expected[step][0], rtol=1e-6)
        np.testing.assert_allclose(update_sq, expected[step][1], rtol=1e-5)
        assert (update_sq > 0).all()
    assert tracker.completed() == []  # handed out once
    assert tracker.error is None
    tracker.close()


def test_unsampled_steps_record_nothing():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = Sampler(answer=None)
    tracker = UpdateTracker(optimizer, list(model.parameters()), sampler.sampled_step)
    step_with_reference(model, optimizer, seed=0)
    assert sampler.asked == 1
    assert tracker.completed() == []
    sampler.answer = 1
    step_with_reference(model, optimizer, seed=1)
    sampler.answer = None
    step_with_reference(model, optimizer, seed=2)
    assert [step for step, _, _ in tracker.completed()] == [1]
    assert tracker.error is None
    tracker.close()


def test_only_the_watched_parameters_are_measured_in_their_order():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watched = [model[1].bias, model[0].weight]
    sampler = Sampler(answer=5)  # kept alive: the tracker holds its method weakly
    tracker = UpdateTracker(optimizer, watched, sampler.sampled_step)
    weight_sq, update_sq = step_with_reference(model, optimizer, seed=3)
    [(step, got_weight, got_update)] = tracker.completed()
    assert step == 5
    np.testing.assert_allclose(got_weight, weight_sq[[3, 0]], rtol=1e-6)
    np.testing.assert_allclose(got_update, update_sq[[3, 0]], rtol=1e-5)
    tracker.close()


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [(torch.float64, 1e-12), (torch.float16, 1e-4), (torch.bfloat16, 1e-4)],
    ids=str,
)
def test_any_dtype_is_measured_in_float32_or_better(dtype, rtol):
    """Values chosen so that half precision would not do: squares beyond float16's range
    (|w| ~ 300, 65504 at most) and norms that bfloat16's 8 bits would round by ~0.4%."""
    torch.manual_seed(1)
    model = torch.nn.Linear(16, 8).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape) * 300).to(dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.7)
    sampler = Sampler(answer=0)
    tracker = UpdateTracker(optimizer, list(model.parameters()), sampler.sampled_step)
    weight_sq, update_sq = step_with_reference(model, optimizer, seed=4)
    assert weight_sq.max() > 65504  # would overflow float16
    [(_, got_weight, got_update)] = tracker.completed()
    assert np.isfinite(got_weight).all()
    np.testing.assert_allclose(got_weight, weight_sq, rtol=rtol)
    np.testing.assert_allclose(got_update, update_sq, rtol=rtol)
    tracker.close()


def test_close_removes_the_optimizer_hooks():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = Sampler(answer=0)
    tracker = UpdateTracker(optimizer, list(model.parameters()), sampler.sampled_step)
    assert len(optimizer._optimizer_step_pre_hooks) == 1
    assert len(optimizer._optimizer_step_post_hooks) == 1
    tracker.close()
    assert len(optimizer._optimizer_step_pre_hooks) == 0
    assert len(optimizer._optimizer_step_post_hooks) == 0
    step_with_reference(model, optimizer, seed=0)
    assert sampler.asked == 0
    assert tracker.completed() == []
    tracker.close()  # twice is fine


def test_an_error_in_the_pre_hook_is_kept_not_raised():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    boom = RuntimeError("sampled_step failed")
    sampler = Sampler(answer=boom)
    tracker = UpdateTracker(optimizer, list(model.parameters()), sampler.sampled_step)
    weights_before = [p.detach().clone() for p in model.parameters()]
    _, update_sq = step_with_reference(model, optimizer, seed=0)  # must not raise
    assert tracker.error is boom
    assert (update_sq > 0).all()  # the optimizer step itself ran
    assert any(not torch.equal(b, p) for b, p in zip(weights_before, model.parameters(), strict=True))
    assert tracker.completed() == []  # the post-hook did not measure a step it has no copy for
    tracker.close()


def test_a_dropped_sampler_means_no_sampled_steps():
    """The tracker holds ``sampled_step`` weakly: the optimizer must not keep a monitor alive."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = Sampler(answer=0)
    tracker = UpdateTracker(optimizer, list(model.parameters()), sampler.sampled_step)
    del sampler
    gc.collect()
    step_with_reference(model, optimizer, seed=0)
    assert tracker.completed() == []
    assert tracker.error is None
    tracker.close()


def test_a_failure_after_the_optimizer_step_reaches_mon_errors_and_training_goes_on(monkeypatch):
    """Through the monitor: measuring the update fails at step 2 (after the optimizer ran);
    the user's step is untouched, the failure is in ``mon.errors``, step 2 has no update
    norms (NaN, nothing made up), the steps around it are measured, and no step's gradient
    statistics are voided for it (the failure belongs to step 2's update, not to step 3)."""
    import gradscope
    from gradscope.monitor import updates

    measure = updates._weight_and_update_sq
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    failing_step = {"now": -1}

    def fails_at_step_2(weight, before):
        if failing_step["now"] == 2:
            raise RuntimeError("measuring the update failed")
        return measure(weight, before)

    monkeypatch.setattr(updates, "_weight_and_update_sq", fails_at_step_2)
    with pytest.warns(gradscope.GradscopeWarning, match="measuring the update failed"):
        with gradscope.watch(model, optimizer=optimizer, track_updates=True, backend="numpy") as mon:
            for step in range(4):
                failing_step["now"] = step
                x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
                model(x).square().mean().backward()
                mon.step()
                before = [p.detach().clone() for p in model.parameters()]
                optimizer.step()
                assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
                optimizer.zero_grad()
    assert any("measuring the update failed" in e for e in mon.errors)
    norms, steps, _ = mon.history("update_norm")
    measured = {int(s): bool(np.isfinite(v).all()) for s, v in zip(steps, norms, strict=True)}
    assert measured.get(2) is not True and measured[1] and measured[3]
    grad_norms, grad_steps, _ = mon.history("norm")
    assert grad_steps.tolist() == [0, 1, 2, 3] and np.isfinite(grad_norms).all()  # no gradient step voided
