"""The learning-rate controller (``watch(..., optimizer=opt, adapt_lr=AdaptiveLR())``).

What is tested: its settings and the errors ``watch`` gives when it cannot work; that the
effective rate is the scheduler's rate times the controller's scale (exactly, against
updates computed by hand and against twin runs at the scaled rate) while the optimizer and
the scheduler keep reporting their own rate; that per-layer scaling equals a per-layer
learning rate; its decisions on hand-built findings (cooldown, evidence newer than the last
change, the floor, the triggers, plateaus); that it leaves healthy runs alone; and that it
saves the demo's run whose learning rate is too high.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from models import loss_of, make
from torch import nn
from torch.nn import functional as F
from training_runs import train_monitored

import gradscope
from gradscope import demo
from gradscope.actions.adaptive_lr import TRIGGERS, AdaptiveLR, LrController, check_optimizer
from gradscope.health.thresholds import Thresholds


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(first=nn.Linear(4, 8), act=nn.Tanh(), last=nn.Linear(8, 2))).double()


def rows_of(model: nn.Module) -> tuple[tuple[str, ...], list[list[torch.Tensor]]]:
    return ("first", "last"), [list(model.first.parameters()), list(model.last.parameters())]


def batches(count: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 4, generator=g, dtype=torch.float64) for _ in range(count)]


def objective(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - x[:, :2].sin()).pow(2).mean()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------------
# 1. Settings and the errors of watch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"factor": 0.0}, ValueError, "factor must be in"),
        ({"factor": 1.0}, ValueError, "factor must be in"),
        ({"factor": 1.5}, ValueError, "factor must be in"),
        ({"factor": True}, ValueError, "factor must be in"),
        ({"factor": "0.5"}, ValueError, "factor must be in"),
        ({"min_scale": 0.0}, ValueError, "min_scale must be in"),
        ({"min_scale": 1.01}, ValueError, "min_scale must be in"),
        ({"min_scale": -0.1}, ValueError, "min_scale must be in"),
        ({"cooldown": -1}, ValueError, "cooldown must be an integer"),
        ({"cooldown": 2.5}, ValueError, "cooldown must be an integer"),
        ({"cooldown": True}, ValueError, "cooldown must be an integer"),
        ({"on": ("exploding", "lr_too_high")}, ValueError, "unknown trigger 'lr_too_high'"),
        ({"on": "nan"}, ValueError, "unknown trigger 'nan'"),
        ({"rise": 0.0}, ValueError, "rise must be a positive fraction"),
        ({"rise": -0.2}, ValueError, "rise must be a positive fraction"),
        ({"window": 2}, ValueError, "window must be an integer >= 3"),
        ({"window": 10.0}, ValueError, "window must be an integer >= 3"),
        ({"per_layer": 1}, TypeError, "per_layer must be True or False"),
        ({"per_layer": "yes"}, TypeError, "per_layer must be True or False"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(options, error, match):
    with pytest.raises(error, match=match):
        AdaptiveLR(**options)


def test_the_unknown_trigger_error_lists_the_triggers():
    with pytest.raises(ValueError) as raised:
        AdaptiveLR(on=("plateau", "oscillation"))
    assert "'oscillation'" in str(raised.value)
    assert all(name in str(raised.value) for name in TRIGGERS)


def test_edge_settings_are_accepted_and_one_trigger_may_be_a_string():
    config = AdaptiveLR(factor=0.999, min_scale=1.0, cooldown=0, on="plateau", window=3, rise=5.0)
    assert config.on == ("plateau",)
    assert AdaptiveLR(on=[]).on == ()
    assert AdaptiveLR().on == TRIGGERS


def test_adapt_lr_without_an_optimizer_is_refused():
    with pytest.raises(ValueError, match="adapt_lr needs optimizer="):
        gradscope.watch(tiny_model(), adapt_lr=True)


def test_adapt_lr_must_be_settings_true_or_none():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"adapt_lr must be a gradscope\.AdaptiveLR"):
        gradscope.watch(model, optimizer=opt, adapt_lr={"factor": 0.5})


class SignDescent(torch.optim.Optimizer):
    """A real optimizer without a learning rate: each step moves every weight by ``size``
    against its gradient's sign (the way optimizers that set their own step size look)."""

    def __init__(self, params, size: float = 1e-3) -> None:
        super().__init__(params, {"lr": None, "size": size})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad.sign(), alpha=-group["size"])


def test_an_optimizer_without_a_numeric_learning_rate_is_refused_naming_the_group():
    model = tiny_model()
    opt = SignDescent([{"params": model.first.parameters(), "lr": 0.1}, {"params": model.last.parameters()}])
    with pytest.raises(ValueError, match=r"SignDescent's learning rate: param group 1 has lr=None"):
        gradscope.watch(model, optimizer=opt, adapt_lr=True)
    # The optimizer itself works (the refusal is about the controller, not a broken optimizer).
    before = params_of(model)
    objective(model, batches(1)[0]).backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_check_optimizer_refuses_what_is_not_an_optimizer():
    with pytest.raises(TypeError, match=r"a torch\.optim\.Optimizer"):
        check_optimizer([{"lr": 0.1}])


def test_per_layer_without_track_updates_is_refused():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs track_updates=True"):
        gradscope.watch(model, optimizer=opt, adapt_lr=AdaptiveLR(per_layer=True))
    with gradscope.watch(model, optimizer=opt, track_updates=True, adapt_lr=AdaptiveLR(per_layer=True)) as mon:
        assert mon.options.adapt_lr.per_layer


def test_adapt_lr_true_means_the_default_settings():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, adapt_lr=True) as mon:
        assert mon.options.adapt_lr == AdaptiveLR()
        assert mon.lr_scale == 1.0
    with gradscope.watch(model, optimizer=opt, adapt_lr=False) as mon:
        assert mon.options.adapt_lr is None
        assert mon.lr_scale == 1.0


# --------------------------------------------------------------------------------------
# 2. The effective rate is the scheduler's times the scale
# --------------------------------------------------------------------------------------

SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5)),
    "exponential": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULERS))
def test_sgd_steps_by_the_schedulers_rate_times_the_scale(schedule):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = SCHEDULERS[schedule](opt)
    controller = LrController(AdaptiveLR(), opt, *rows_of(model))
    controller.scale = 0.25
    seen = []
    for x in batches(9):
        objective(model, x).backward()
        lr = opt.param_groups[0]["lr"]
        assert lr == scheduler.get_last_lr()[0]  # between steps: the scheduler's own rate
        before, grads = params_of(model), [p.grad.clone() for p in model.parameters()]
        opt.step()
        for param, old, grad in zip(model.parameters(), before, grads, strict=True):
            torch.testing.assert_close(param.detach(), old - (lr * 0.25) * grad, rtol=1e-12, atol=1e-15)
        assert opt.param_groups[0]["lr"] == lr  # put back right after the step
        opt.zero_grad()
        scheduler.step()
        seen.append(scheduler.get_last_lr()[0])
    # The schedule is the one the scheduler follows alone (a chainable scheduler did not
    # compound the scaled rate).
    plain = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    alone = SCHEDULERS[schedule](plain)
    expected = []
    for _ in range(9):
        plain.step()
        alone.step()
        expected.append(alone.get_last_lr()[0])
    assert seen == expected
    assert len(set(seen)) > 2  # the schedule did change the rate


def test_every_param_group_is_scaled_from_its_own_rate():
    model = tiny_model()
    opt = torch.optim.SGD(
        [{"params": model.first.parameters(), "lr": 0.2}, {"params": model.last.parameters()}], lr=0.03
    )
    controller = LrController(AdaptiveLR(), opt, *rows_of(model))
    controller.scale = 0.5
    objective(model, batches(1)[0]).backward()
    before, grads = params_of(model), [p.grad.clone() for p in model.parameters()]
    opt.step()
    rates = [0.1, 0.1, 0.015, 0.015]  # first.weight, first.bias, last.weight, last.bias
    for param, old, grad, rate in zip(model.parameters(), before, grads, rates, strict=True):
        torch.testing.assert_close(param.detach(), old - rate * grad, rtol=1e-12, atol=1e-15)
    assert [group["lr"] for group in opt.param_groups] == [0.2, 0.03]


def train_twin(make_opt, scale: float, steps: int = 15, scheduled: bool = True):
    """Train tiny_model() with the optimizer ``make_opt(params)`` (and a warm-up) under a
    controller at ``scale`` (no controller when scale is None)."""
    model = tiny_model()
    opt = make_opt(model.parameters())
    scheduler = SCHEDULERS["lambda"](opt) if scheduled else None
    controller = LrController(AdaptiveLR(), opt, *rows_of(model)) if scale is not None else None
    if controller is not None:
        controller.scale = scale
    for x in batches(steps):
        objective(model, x).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
    return model, opt, scheduler


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda lr: lambda p: torch.optim.Adam(p, lr=lr),
        lambda lr: lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.1),
        lambda lr: lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
        lambda lr: lambda p: torch.optim.RMSprop(p, lr=lr),
    ],
    ids=["adam", "adamw", "sgd-nesterov", "rmsprop"],
)
def test_a_scaled_optimizer_follows_its_twin_at_the_scaled_rate(make_opt):
    scaled, opt, scheduler = train_twin(make_opt(1e-2), scale=0.25)
    twin, _, _ = train_twin(make_opt(2.5e-3), scale=None)
    unscaled, _, _ = train_twin(make_opt(1e-2), scale=None)
    for a, b, c in zip(scaled.parameters(), twin.parameters(), unscaled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert (a - c).abs().max() > 1e-4  # the scale did change the training
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2) == scheduler.get_last_lr()[0]


def test_a_tensor_learning_rate_is_scaled_and_left_as_it_was():
    lr = torch.tensor(1e-2, dtype=torch.float64)
    scaled, opt, _ = train_twin(lambda p: torch.optim.Adam(p, lr=lr), scale=0.5, scheduled=False)
    twin, _, _ = train_twin(lambda p: torch.optim.Adam(p, lr=5e-3), scale=None, scheduled=False)
    for a, b in zip(scaled.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 1e-2


def test_closing_the_controller_removes_its_hooks():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = LrController(AdaptiveLR(), opt, *rows_of(model))
    controller.scale = 0.25
    controller.layer_scale[0] = 0.5
    controller.close()
    x = batches(1)[0]
    objective(model, x).backward()
    before, grads = params_of(model), [p.grad.clone() for p in model.parameters()]
    opt.step()
    for param, old, grad in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(param.detach(), old - 0.1 * grad, rtol=1e-12, atol=1e-15)


def test_a_step_that_never_finished_leaves_the_users_rate(monkeypatch):
    """Lightning (no GradScaler) runs the optimizer's step pre-hooks, then the closure; a halt
    raised in the closure skips the post-hook. The rate must neither stay scaled after close()
    nor compound on the next step."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = LrController(AdaptiveLR(), opt, *rows_of(model))
    controller.scale = 0.5

    def halting_closure():
        raise RuntimeError("halted inside the closure")

    with pytest.raises(RuntimeError, match="halted"):
        opt.step(halting_closure)
    assert opt.param_groups[0]["lr"] == 0.05  # scaled for the step that never finished
    x = batches(1)[0]
    objective(model, x).backward()
    assert sgd_updates_by(model, opt, opt.step) == pytest.approx(0.05)  # 0.1 x 0.5, not 0.1 x 0.25
    assert opt.param_groups[0]["lr"] == 0.1
    with pytest.raises(RuntimeError, match="halted"):
        opt.step(halting_closure)
    controller.close()
    assert opt.param_groups[0]["lr"] == 0.1


def sgd_updates_by(model, opt, step_once) -> float:
    """The learning rate the next ``opt.step()`` (inside ``step_once()``) applies (plain SGD)."""
    before = params_of(model)
    step_once()
    weight, old = model.first.weight.detach(), before[0]
    grad = model.first.weight.grad
    rates = (old - weight) / grad
    torch.testing.assert_close(rates, torch.full_like(rates, rates.flatten()[0].item()), rtol=1e-9, atol=0)
    return rates.flatten()[0].item()


def test_a_cut_applies_to_the_optimizer_step_right_after_mon_step_and_ends_with_the_monitor():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = batches(20)

    def step_once(step, mon=None, spike=1.0):
        loss = objective(model, xs[step])
        loss.backward()
        if mon is not None:
            mon.step(loss=loss * spike)
        opt.step()  # the gradient stays: the rate of this step is measured from it

    rates = []
    with gradscope.watch(model, optimizer=opt, adapt_lr=AdaptiveLR(on=("loss_spike",))) as mon:
        for step in range(12):
            spike = 20.0 if step == 10 else 1.0
            rates.append(sgd_updates_by(model, opt, lambda s=step, k=spike: step_once(s, mon, k)))
            opt.zero_grad()
        (action,) = mon.report().actions
    assert action["step"] == 10 and action["message"].startswith("lr 0.1 -> 0.05 at step 10 because loss_spike")
    assert rates[:10] == pytest.approx([0.1] * 10, rel=1e-9)
    assert rates[10:] == pytest.approx([0.05, 0.05], rel=1e-9)  # the step that decided already uses it
    assert mon.lr_scale == 0.5
    assert opt.param_groups[0]["lr"] == 0.1
    # Closed, the monitor leaves the optimizer as it found it.
    assert sgd_updates_by(model, opt, lambda: step_once(12)) == pytest.approx(0.1, rel=1e-9)


# --------------------------------------------------------------------------------------
# 3. Per-layer scaling of updates
# --------------------------------------------------------------------------------------

OPTIMIZERS = {
    "adam": lambda groups, lr: torch.optim.Adam(groups, lr=lr),
    "sgd-momentum": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_layer_scale_scales_that_layers_update_and_no_other(name):
    make_opt = OPTIMIZERS[name]
    scaled, plain = tiny_model(), tiny_model()
    opt = make_opt(scaled.parameters(), 1e-2)
    plain_opt = make_opt(plain.parameters(), 1e-2)
    controller = LrController(AdaptiveLR(), opt, *rows_of(scaled))
    controller.layer_scale[0] = 0.3
    for x in batches(6):
        # The twin starts each step where the scaled model is, with its optimizer state.
        plain.load_state_dict(scaled.state_dict())
        plain_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # not shared
        before = {key: value.clone() for key, value in scaled.state_dict().items()}
        for model, optimizer in ((scaled, opt), (plain, plain_opt)):
            objective(model, x).backward()
            optimizer.step()
            optimizer.zero_grad()
        after, full = scaled.state_dict(), plain.state_dict()
        for key in ("first.weight", "first.bias"):
            torch.testing.assert_close(after[key], before[key] + 0.3 * (full[key] - before[key]))
            assert not torch.allclose(after[key], full[key])
        for key in ("last.weight", "last.bias"):
            torch.testing.assert_close(after[key], full[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize(("scale", "layer_scale"), [(1.0, 0.5), (0.5, 0.5)])
def test_a_layer_scale_is_a_per_layer_learning_rate(name, scale, layer_scale):
    """Over many steps, a layer scaled by s trains as that layer would with a learning rate s
    times smaller (its own parameter group), combined with the global scale."""
    make_opt, lr = OPTIMIZERS[name], 1e-2
    scaled, twin = tiny_model(), tiny_model()
    opt = make_opt(scaled.parameters(), lr)
    controller = LrController(AdaptiveLR(), opt, *rows_of(scaled))
    controller.scale, controller.layer_scale[1] = scale, layer_scale
    twin_opt = make_opt(
        [
            {"params": twin.first.parameters(), "lr": lr * scale},
            {"params": twin.last.parameters(), "lr": lr * scale * layer_scale},
        ],
        lr,
    )
    for x in batches(20):
        for model, optimizer in ((scaled, opt), (twin, twin_opt)):
            objective(model, x).backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(scaled.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert [group["lr"] for group in opt.param_groups] == [lr]


def test_per_layer_control_on_a_real_run_slows_only_the_layer_whose_updates_are_too_large():
    """Plain SGD, the output layer at a rate whose updates are about its own size: the
    controller halves that layer's updates (and only its), from the step that decided, and the
    tracked updates are the ones applied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    lrs = (0.01, 0.5)
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": lrs[0]}, {"params": model[2].parameters(), "lr": lrs[1]}]
    )
    g = torch.Generator().manual_seed(1)
    rates, applied = [], []  # per step and layer: |update| / |gradient|, and |update|
    config = AdaptiveLR(per_layer=True, on=(), cooldown=20)
    with gradscope.watch(model, optimizer=opt, track_updates=True, adapt_lr=config) as mon:
        mon._responder.cadence.budget = 1e9  # judge at every step: the decision's step does not hang on timing
        for _ in range(30):
            x = torch.randn(32, 8, generator=g)
            F.mse_loss(model(x), torch.sin(x[:, :1])).backward()
            mon.step()
            layers = [list(model[0].parameters()), list(model[2].parameters())]
            before = [[p.detach().clone() for p in layer] for layer in layers]
            grads = [torch.cat([p.grad.flatten() for p in layer]) for layer in layers]
            opt.step()
            opt.zero_grad()
            moved = [
                torch.cat([(p.detach() - b).flatten() for p, b in zip(layer, old, strict=True)])
                for layer, old in zip(layers, before, strict=True)
            ]
            rates.append([float(m.norm() / gr.norm()) for m, gr in zip(moved, grads, strict=True)])
            applied.append([float(m.norm()) for m in moved])
        (action,) = mon.report().actions
    at = action["step"]
    assert action["detail"]["layers"] == ["2"] and action["detail"]["scale"] == 0.5
    assert action["message"].startswith(f"updates of '2' x1 -> x0.5 at step {at} because its update/weight ratio")
    assert mon._responder.lr.layer_scale == {1: 0.5} and mon.lr_scale == 1.0
    rates = np.array(rates)
    np.testing.assert_allclose(rates[:, 0], lrs[0], rtol=1e-4)  # the other layer: untouched
    np.testing.assert_allclose(rates[:at, 1], lrs[1], rtol=1e-4)
    np.testing.assert_allclose(rates[at:, 1], lrs[1] * 0.5, rtol=1e-4)
    tracked = mon.history("update_norm")
    np.testing.assert_array_equal(tracked.steps, np.arange(30))
    np.testing.assert_allclose(tracked.values, np.array(applied), rtol=1e-4)


# --------------------------------------------------------------------------------------
# 4. Decisions
# --------------------------------------------------------------------------------------


def finding(kind, step, since=None, layer=None, severity="critical", layers=(), **evidence):
    return gradscope.Finding(
        kind=kind,
        severity=severity,
        layer=layer,
        step=step,
        since_step=step if since is None else since,
        message=f"{kind} found",
        suggestion="",
        evidence=evidence,
        layers=layers,
    )


def controller(lr: float = 0.1, **settings) -> LrController:
    model = tiny_model()
    return LrController(AdaptiveLR(**settings), torch.optim.SGD(model.parameters(), lr=lr), *rows_of(model))


T = Thresholds()


def decide(lr: LrController, findings, step: int, loss_spike=None):
    """What the monitor does at the end of ``mon.step()``: decide, then apply the decision
    from the next optimizer step on."""
    actions = lr.decide(findings, None, T, loss_spike, step)
    lr.apply()
    return actions


def test_an_exploding_gradient_halves_the_rate_and_says_why():
    lr = controller()
    actions = decide(lr, [finding("exploding", 10, layer="last")], 10)
    assert lr.scale == 0.5
    (action,) = actions
    assert (action.step, action.action) == (10, "lr")
    assert action.message == "lr 0.1 -> 0.05 at step 10 because exploding in 'last': exploding found"
    assert action.detail == {
        "old": 0.1,
        "new": 0.05,
        "old_scale": 1.0,
        "scale": 0.5,
        "groups": 1,
        "because": {"kind": "exploding", "layer": "last", "step": 10},
    }


def test_the_record_gives_the_effective_rates_of_the_schedulers_rate():
    lr = controller(lr=0.1, cooldown=0)
    lr._optimizer.param_groups[0]["lr"] = 0.04  # where a scheduler has taken it
    decide(lr, [finding("divergence", 5)], 5)
    (action,) = decide(lr, [finding("divergence", 6)], 6)
    assert (action.detail["old"], action.detail["new"]) == (pytest.approx(0.02), pytest.approx(0.01))
    assert action.message.startswith("lr 0.02 -> 0.01 at step 6 because divergence: ")  # no layer named


def test_no_second_cut_during_the_cooldown():
    lr = controller(cooldown=50)
    assert decide(lr, [finding("exploding", 10, layer="last")], 10)
    for step in (11, 30, 59):
        assert decide(lr, [finding("exploding", step, layer="last")], step) == []
    assert lr.scale == 0.5
    (action,) = decide(lr, [finding("exploding", 60, layer="last")], 60)
    assert lr.scale == 0.25 and action.detail["old_scale"] == 0.5


def test_evidence_no_newer_than_the_last_change_does_not_cut_again():
    lr = controller(cooldown=0)
    decide(lr, [finding("exploding", 10, since=3, layer="last")], 12)
    assert lr.scale == 0.5
    # The same finding, still reported long after: the cut already answered it.
    assert decide(lr, [finding("exploding", 10, since=3, layer="last")], 500) == []
    assert decide(lr, [finding("exploding", 12, since=3, layer="last")], 501) == []
    assert decide(lr, [finding("exploding", 13, since=3, layer="last")], 502)
    assert lr.scale == 0.25


def test_the_rate_never_goes_below_min_scale():
    lr = controller(cooldown=0, min_scale=0.3)
    scales = []
    for step in range(1, 6):
        for action in decide(lr, [finding("divergence", step)], step):
            scales.append(action.detail["scale"])
    assert scales == [0.5, 0.3]  # the second cut stops at the floor, then no more cuts
    assert lr.scale == 0.3


def test_triggers_not_asked_for_are_ignored():
    lr = controller(on=("plateau",), cooldown=0)
    assert decide(lr, [finding("exploding", 5, layer="last"), finding("divergence", 5)], 5, (5, 9.0, 1.0)) == []
    assert lr.scale == 1.0
    lr = controller(on=("exploding",), cooldown=0)
    assert decide(lr, [finding("dead", 5, layer="first"), finding("vanishing", 5, layer="first")], 5) == []
    assert decide(lr, [finding("exploding", 6, layer="first")], 6)
    assert lr.scale == 0.5


def test_a_loss_spike_cuts_once():
    lr = controller(cooldown=0)
    assert decide(lr, [], 11) == []
    (action,) = decide(lr, [], 12, (12, 9.0, 1.5))
    assert action.message == (
        "lr 0.1 -> 0.05 at step 12 because loss_spike: the loss spiked to 9 at step 12, 6.0x its running median"
    )
    assert action.detail["because"] == {"kind": "loss_spike", "layer": None, "step": 12}
    assert decide(lr, [], 100, (12, 9.0, 1.5)) == []  # the same spike again
    assert decide(lr, [], 101, (101, 9.0, 1.5))  # a new one
    assert lr.scale == 0.25


def test_a_loss_spike_is_not_a_trigger_unless_asked_for():
    lr = controller(on=("exploding", "divergence", "plateau"))
    assert decide(lr, [], 12, (12, 9.0, 1.5)) == []
    assert lr.scale == 1.0


def plateau(step, since, waited, patience):
    return finding("plateau", step, since=since, severity="info", metric="loss", waited=waited, patience=patience)


def test_a_plateau_cuts_once_and_again_only_after_as_long_again():
    lr = controller(cooldown=10)
    # Per-step loss: no improvement since step 100, for 100 steps (the check's patience).
    assert decide(lr, [plateau(200, 100, 100, 100)], 200)
    cuts = []
    for step in range(201, 320):
        if decide(lr, [plateau(step, 100, step - 100, 100)], step):
            cuts.append(step)
    assert cuts == [300]  # 100 steps after the first cut
    assert lr.scale == 0.25


def test_a_plateau_of_evaluations_waits_as_many_evaluations_again():
    lr = controller(cooldown=0)
    # val_loss, evaluated every 50 steps: no improvement since step 250, 5 evaluations waited.
    assert decide(lr, [plateau(500, 250, 5, 5)], 500)
    assert not decide(lr, [plateau(700, 250, 9, 5)], 700)
    assert not decide(lr, [plateau(700, 250, 9, 5)], 749)
    assert decide(lr, [plateau(750, 250, 10, 5)], 750)


def test_a_plateau_that_improved_since_the_cut_waits_from_the_improvement():
    lr = controller(cooldown=0)
    assert decide(lr, [plateau(200, 100, 100, 100)], 200)
    # The loss improved at step 250 and then stalled again for 100 steps.
    assert not decide(lr, [plateau(349, 250, 99, 100)], 349)
    assert decide(lr, [plateau(350, 250, 100, 100)], 350)


def stalled_high(step, layers, ratios, side="high"):
    return finding(
        "stalled_updates",
        step,
        since=step - 4,
        layer=layers[0],
        severity="warning",
        layers=tuple(layers),
        side=side,
        bound=0.1,
        ratio=dict(zip(layers, ratios, strict=True)),
    )


def test_per_layer_scales_the_layers_whose_updates_are_too_large():
    lr = controller(per_layer=True, cooldown=20)
    actions = decide(lr, [stalled_high(40, ["last"], [0.35])], 40)
    (action,) = actions
    assert lr.layer_scale == {1: 0.5} and lr.scale == 1.0  # the layer, not the whole rate
    assert action.action == "lr" and action.step == 40
    assert action.message == "updates of 'last' x1 -> x0.5 at step 40 because its update/weight ratio 0.35 is above 0.1"
    assert action.detail == {
        "layers": ["last"],
        "old_scale": 1.0,
        "scale": 0.5,
        "because": {"kind": "stalled_updates", "layer": "last", "step": 40},
    }
    assert decide(lr, [stalled_high(50, ["last"], [0.3])], 50) == []  # cooldown
    (action,) = decide(lr, [stalled_high(55, ["first", "last"], [0.2, 0.3])], 55)
    assert action.detail["layers"] == ["first"]  # "last" is still cooling down
    assert lr.layer_scale == {0: 0.5, 1: 0.5}
    assert decide(lr, [stalled_high(40, ["last"], [0.3])], 70) == []  # no newer evidence
    assert decide(lr, [stalled_high(70, ["last"], [0.3])], 70)
    assert lr.layer_scale == {0: 0.5, 1: 0.25}


def test_per_layer_ignores_small_updates_unknown_layers_and_is_off_by_default():
    lr = controller(per_layer=True, cooldown=0)
    assert decide(lr, [stalled_high(40, ["last"], [1e-9], side="low")], 40) == []
    assert decide(lr, [stalled_high(41, ["head"], [0.5])], 41) == []
    assert lr.layer_scale == {}
    off = controller(cooldown=0)
    assert decide(off, [stalled_high(40, ["last"], [0.5])], 40) == []
    assert off.layer_scale == {}


def test_per_layer_scales_stop_at_min_scale():
    lr = controller(per_layer=True, cooldown=0, min_scale=0.2)
    scales = []
    for step in range(1, 6):
        for action in decide(lr, [stalled_high(step, ["first"], [0.5])], step):
            scales.append(action.detail["scale"])
    assert scales == [0.5, 0.25, 0.2]
    assert lr.layer_scale == {0: 0.2}


# --------------------------------------------------------------------------------------
# 5. Healthy runs are left alone
# --------------------------------------------------------------------------------------


def train_watched(model, opt, steps, loss_at, **watch_options):
    """The run under ``watch(..., optimizer=opt)``, closed; returns the monitor."""
    mon, _ = train_monitored(model, opt, steps, loss_at, optimizer=opt, **watch_options)
    mon.close()
    return mon


def regression_run(seed, steps, **watch_options):
    """The healthy twin of tests/health/test_real_failures_training.py's Adam runs: a ReLU
    MLP on a smooth regression target, Adam at lr=1e-3, a fresh batch each step."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            hidden1=nn.Linear(8, 64), relu1=nn.ReLU(), hidden2=nn.Linear(64, 64), relu2=nn.ReLU(), out=nn.Linear(64, 1)
        )
    )
    g = torch.Generator().manual_seed(seed + 1)

    def loss_at(step):
        x = torch.randn(64, 8, generator=g)
        return F.mse_loss(model(x), torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3])

    return train_watched(model, torch.optim.Adam(model.parameters(), lr=1e-3), steps, loss_at, **watch_options)


@pytest.mark.parametrize(
    "seed",
    [
        0,
        1,
        2,
    ],
)
def test_the_controller_never_changes_the_rate_of_a_healthy_regression(seed):
    mon = regression_run(seed, 300, adapt_lr=True)
    report = mon.report()
    losses = mon.history("loss").values
    assert losses[-50:].mean() < 0.5 * losses[:50].mean()  # it learns
    assert report.findings == (), str(report)  # the report sees nothing wrong...
    assert report.actions == (), report.actions  # ...and the controller does nothing
    assert mon.lr_scale == 1.0


@pytest.mark.parametrize("name", ["mlp", "convnet", "transformer"])
def test_the_controller_never_changes_the_rate_of_a_healthy_model(name):
    """Each model of tests/models.py learns a fixed set of 8 batches with Adam."""
    model = make(name)
    mon = train_watched(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        200,
        lambda step: loss_of(name, model, step % 8),
        adapt_lr=True,
    )
    report = mon.report()
    losses = mon.history("loss").values
    assert losses[-20:].mean() < losses[:8].mean()
    assert report.status == "healthy", str(report)
    assert report.actions == ()
    assert mon.lr_scale == 1.0
    assert mon._responder.judgements >= 1  # it did look


def test_the_demo_without_a_fault_takes_no_learning_rate_action():
    mon = demo.run("none", 300, act=True)
    actions = mon.report().actions
    assert [a for a in actions if a["action"] == "lr"] == [], actions
    assert mon.lr_scale == 1.0


# --------------------------------------------------------------------------------------
# 6. A learning rate too high: the controller saves the run
# --------------------------------------------------------------------------------------


def high_lr_run(adapt_lr, steps=300):
    """The demo's ``high-lr`` loop (Adam warming up to 5e-2) without early stopping or halting."""
    model = demo.build("high-lr")
    task = demo.SyntheticTask()
    opt = torch.optim.Adam(model.parameters(), lr=demo.HIGH_LR)
    warmup = steps // 2
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    losses = []
    with gradscope.watch(model, optimizer=opt, adapt_lr=adapt_lr) as mon:
        for _ in range(steps):
            x, y = task.batch()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
            schedule.step()
            losses.append(loss.item())
    return mon, np.array(losses), schedule


def test_the_controller_saves_a_run_whose_learning_rate_is_too_high():
    lost, lost_losses, _ = high_lr_run(None)
    saved, saved_losses, schedule = high_lr_run(AdaptiveLR())
    lost_report, saved_report = lost.report(), saved.report()
    # Without it: the loss climbs back, diverges and stays at the loss of guessing (ln 8).
    assert "divergence" in {f.kind for f in lost_report.findings}, str(lost_report)
    assert lost_losses[-20:].mean() > 1.9
    # With it: the rate is cut when the loss climbs back, and the run recovers.
    cuts = [a for a in saved_report.actions if a["action"] == "lr"]
    assert cuts, str(saved_report)
    assert cuts[0]["detail"]["because"]["kind"] in ("divergence", "exploding", "loss_spike")
    assert saved.lr_scale == cuts[-1]["detail"]["scale"] <= 0.5
    assert saved_losses[-20:].mean() < lost_losses[-20:].mean() - 0.3
    assert "divergence" not in {f.kind for f in saved_report.findings}, str(saved_report)
    # Until the first cut the two runs are the same run.
    first = cuts[0]["step"]
    np.testing.assert_array_equal(saved_losses[: first + 1], lost_losses[: first + 1])
    assert schedule.get_last_lr()[0] == pytest.approx(demo.HIGH_LR)  # the schedule is untouched
    assert math.isclose(cuts[0]["detail"]["old"], schedule.lr_lambdas[0](first) * demo.HIGH_LR)


def test_the_demo_with_act_cuts_the_learning_rate_of_the_high_lr_fault():
    mon = demo.run("high-lr", 300, act=True)
    report = mon.report()
    cuts = [a for a in report.actions if a["action"] == "lr"]
    assert cuts, str(report)
    assert mon.lr_scale < 1.0
    losses = mon.history("loss").values
    assert losses[-20:].mean() < 1.9  # the run without act ends above 1.9 (see the test above)
    assert "divergence" not in {f.kind for f in report.findings}, str(report)
