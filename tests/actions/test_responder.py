"""The monitor's responder (``gradscope.actions.responder``), driven by real training runs.

What is tested: a quiet run is judged far less often than it steps, yet a NaN is judged (and
halts the run) at its own step; the halt becomes an action record; early stopping alone
never judges; a broken ``on_finding`` never reaches training, while a ``TrainingHalted``
raised by the callback itself does; and a loop that catches a halt and goes on.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope


def train(steps, nan_at=(), report_nan_at=(), tight_budget=False, **watch_options):
    """A small regression under ``watch``. ``nan_at``: steps whose loss (and so gradients) is
    NaN; ``report_nan_at``: steps whose *reported* loss is NaN (the gradients are fine). A
    caught ``TrainingHalted`` skips that step's update, as a careful loop would. Returns the
    monitor, the halts caught as ``(mon.step's step, the exception)``, and the steps run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    halts, ran = [], 0
    with gradscope.watch(model, optimizer=opt, **watch_options) as mon:
        if tight_budget:  # between alarms, never judge by time: only an alarm can make it judge
            mon._responder.cadence.budget = 1e-12
        for step in range(steps):
            x = torch.randn(32, 8, generator=g)
            loss = nn.functional.mse_loss(model(x), torch.sin(x[:, :1]))
            if step in nan_at:
                loss = loss * math.nan
            loss.backward()
            ran += 1
            try:
                mon.step(loss=math.nan if step in report_nan_at else loss)
            except gradscope.TrainingHalted as halt:
                halts.append((step, halt))
                opt.zero_grad()
                continue
            opt.step()
            opt.zero_grad()
    return mon, halts, ran


def test_a_quiet_run_is_judged_far_less_often_than_it_steps():
    mon, halts, ran = train(300, halt_on="nonfinite")
    assert halts == [] and ran == 300
    assert 1 <= mon._responder.judgements <= 300 // 5, mon._responder.judgements
    assert mon.report().actions == ()


def test_a_nan_is_judged_and_halts_at_its_own_step():
    mon, halts, _ = train(300, nan_at=(150,), tight_budget=True, halt_on="nonfinite")
    ((step, halt),) = halts
    assert step == halt.step == 150
    assert halt.finding.kind == "nonfinite" and halt.finding.since_step == 150
    assert mon.halted is halt
    assert halt.report.status == "critical"
    assert mon._responder.judgements <= 300 // 5  # it was the alarm, not a judgement every step


def test_a_halt_is_an_action_record_naming_the_finding():
    mon, halts, _ = train(120, nan_at=(60,), halt_on="nonfinite")
    ((_, halt),) = halts
    (action,) = mon.report().actions
    assert action["step"] == 60 and action["action"] == "halt"
    assert action["message"].startswith("halted at step 60 because nonfinite")
    assert action["detail"]["because"] == {
        "kind": "nonfinite",
        "layer": halt.finding.layer,
        "step": halt.finding.step,
    }


def test_a_run_without_halt_on_is_not_halted_by_a_nan():
    mon, halts, ran = train(80, nan_at=(40,), early_stopping=True)
    assert halts == [] and ran == 80 and mon.halted is None
    assert "nonfinite" in {f.kind for f in mon.report().findings}


def test_early_stopping_alone_never_judges_the_run():
    mon, _, _ = train(200, early_stopping=gradscope.EarlyStopping(metric="loss", patience=10**6))
    assert mon._responder.judgements == 0
    assert not mon.should_stop


def test_a_broken_on_finding_never_reaches_training():
    seen = []

    def on_finding(finding):
        seen.append(finding)
        raise ValueError("the user's callback is broken")

    with pytest.warns(RuntimeWarning, match="on_finding raised ValueError: the user's callback is broken"):
        mon, halts, ran = train(120, report_nan_at=(50,), on_finding=on_finding)
    assert ran == 120 and halts == []
    assert [(f.kind, f.step) for f in seen] == [("nonfinite", 50)]  # called once, at the NaN's own step
    (error,) = [e for e in mon.errors if "on_finding" in e]
    assert "for the nonfinite finding at step 50" in error


def test_a_training_halted_raised_by_on_finding_halts_the_run():
    def on_finding(finding):
        if finding.kind == "nonfinite":
            raise gradscope.TrainingHalted(finding, None, finding.step)

    mon, halts, _ = train(100, report_nan_at=(30,), on_finding=on_finding)
    ((step, halt),) = halts
    assert step == 30 and halt.finding.kind == "nonfinite"
    assert mon.halted is halt
    assert [a["action"] for a in mon.report().actions] == ["halt"]


def test_on_finding_is_called_once_per_finding_not_once_per_step():
    seen = []
    mon, _, _ = train(150, report_nan_at=(20,), tight_budget=True, on_finding=seen.append)
    assert [(f.kind, f.step) for f in seen] == [("nonfinite", 20)]
    assert mon._responder.judgements >= 2  # it was judged again after step 20, and stayed quiet
    assert mon.errors == []


def test_a_loop_that_catches_a_halt_is_halted_again_by_a_later_nan():
    _, halts, _ = train(150, nan_at=(40, 100), halt_on="nonfinite")
    assert [step for step, _ in halts] == [40, 100]


class BrokenView:
    """A view whose every array read fails: the checks cannot judge anything."""

    def __getattr__(self, name):
        raise RuntimeError(f"view field {name!r} is unreadable")


def test_a_failure_of_the_responder_itself_never_reaches_training():
    """Judging fails at every judgement (every check and the controller read a broken view):
    training runs to the end, the failure is in ``mon.errors`` with one warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning) as caught:
        with gradscope.watch(model, optimizer=opt, halt_on="critical", adapt_lr=True) as mon:
            mon._responder.cadence.budget = 1e9  # judge at every step
            import gradscope.monitor.acting as acting

            real = acting.view_of
            acting.view_of = lambda state, thresholds: BrokenView()
            try:
                for _ in range(20):
                    x = torch.randn(32, 8)
                    nn.functional.mse_loss(model(x), x[:, :1]).backward()
                    mon.step(loss=1.0)
                    opt.step()
                    opt.zero_grad()
            finally:
                acting.view_of = real
            assert mon.step_index == 20
    assert mon.errors and all("acting on findings failed" in e for e in mon.errors), mon.errors
    assert len([w for w in caught if "acting on findings failed" in str(w.message)]) == 1
    assert mon.lr_scale == 1.0
