"""``Monitor.state_dict`` / ``load_state_dict``: a resumed run continues where its checkpoint left.

A run is cut in two at a checkpoint (the state goes through ``torch.save``/``torch.load``, as
in a real checkpoint, with the model and optimizer state) and resumed in a new monitor of a
new model; it is compared with the same run done in one piece: step numbers continue, early
stopping stops at the same evaluation with the same best step and value, and a learning rate
the controller cut stays cut (measured from the SGD update the optimizer applies).
"""

from __future__ import annotations

import copy
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn

import gradscope
from gradscope.monitor import checkpoint as checkpoint_format
from gradscope.run import records

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(first=nn.Linear(4, 8), act=nn.Tanh(), last=nn.Linear(8, 2))).double()


def batch(step: int) -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(step), dtype=torch.float64)


def objective(model: nn.Module, step: int) -> torch.Tensor:
    x = batch(step)
    return (model(x) - x[:, :2].sin()).pow(2).mean()


VAL = [1.0, 0.8, 0.7, 0.75, 0.72, 0.71, 0.9, 0.95, 0.99]
"""A validation metric, one value every 3 steps: best 0.7 at the third evaluation."""


def train(model, opt, mon, steps: range, spike_at: int | None = None) -> list[float]:
    """Steps ``steps`` of a run: the SGD rate each optimizer step applied (from the update)."""
    rates = []
    for step in steps:
        loss = objective(model, step)
        loss.backward()
        mon.step(loss=loss * (20.0 if step == spike_at else 1.0))
        before = model.first.weight.detach().clone()
        grad = model.first.weight.grad.detach().clone()
        opt.step()
        rates.append(((before - model.first.weight.detach()) / grad).flatten()[0].item())
        opt.zero_grad()
        if step % 3 == 2:
            mon.log(val_loss=VAL[step // 3])
    return rates


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # plain Python values: loads without pickle


def options(opt) -> dict:
    return {
        "optimizer": opt,
        "early_stopping": gradscope.EarlyStopping(metric="val_loss", patience=4),
        "adapt_lr": gradscope.AdaptiveLR(on=("loss_spike",)),
        "backend": "numpy",
    }


def test_a_resumed_run_continues_as_the_run_in_one_piece():
    cut, total = 12, 27
    whole_model = tiny_model()
    whole_opt = torch.optim.SGD(whole_model.parameters(), lr=0.1)
    with gradscope.watch(whole_model, **options(whole_opt)) as whole:
        whole_rates = train(whole_model, whole_opt, whole, range(total), spike_at=5)
        whole_norm = whole.history("norm")

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, **options(opt)) as first:
        rates = train(model, opt, first, range(cut), spike_at=5)
        assert first.lr_scale == 0.5  # the spike at step 5 cut the rate
        checkpoint = roundtrip(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "gradscope": first.state_dict()}
        )
    resumed_model = tiny_model()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt = torch.optim.SGD(resumed_model.parameters(), lr=0.1)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    with gradscope.watch(resumed_model, **options(resumed_opt)) as resumed:
        resumed.load_state_dict(checkpoint["gradscope"])
        assert resumed.lr_scale == 0.5 and resumed.step_index == cut
        rates += train(resumed_model, resumed_opt, resumed, range(cut, total))
        norm = resumed.history("norm")
        assert resumed.should_stop and whole.should_stop
        assert (resumed.best_step, resumed.best_value) == (whole.best_step, whole.best_value) == (8, 0.7)
        assert resumed.stop_reason == whole.stop_reason

    assert rates == pytest.approx(whole_rates, rel=1e-9)  # the cut rate stayed cut after the resume
    assert whole_rates[4] == pytest.approx(0.1) and whole_rates[-1] == pytest.approx(0.05)
    assert list(norm.steps) == list(range(cut, total))
    torch.testing.assert_close(
        torch.from_numpy(norm.values), torch.from_numpy(whole_norm.values[cut:]), rtol=1e-12, atol=0
    )


def test_without_actions_only_the_step_count_is_kept():
    model = tiny_model()
    with gradscope.watch(model, backend="numpy") as mon:
        train(model, torch.optim.SGD(model.parameters(), lr=0.1), mon, range(4))
        state = mon.state_dict()
    assert state == {"version": 1, "step": 4, "actions": {}}
    again = tiny_model()
    with gradscope.watch(again, every=2, backend="numpy") as mon:
        mon.load_state_dict(copy.deepcopy(state))
        train(again, torch.optim.SGD(again.parameters(), lr=0.1), mon, range(4, 8))
        assert list(mon.history("norm").steps) == [4, 6]  # every=2 counts from the resumed step


def test_loading_is_refused_after_the_first_step_and_for_a_foreign_state():
    model = tiny_model()
    with gradscope.watch(model, backend="numpy") as mon:
        message = r"^Monitor\.load_state_dict: not a gradscope monitor state \(from Monitor\.state_dict\(\)\)$"
        with pytest.raises(ValueError, match=message):
            mon.load_state_dict({"step": 3})
        with pytest.raises(ValueError, match="not a gradscope monitor state"):
            mon.load_state_dict([1, 2])
        train(model, torch.optim.SGD(model.parameters(), lr=0.1), mon, range(1))
        with pytest.raises(RuntimeError, match=r"before the first mon\.step"):
            mon.load_state_dict({"version": 1, "step": 3, "actions": {}})


def test_the_state_is_made_of_the_parts_states_and_a_resumed_log_closes_at_the_resumed_count(tmp_path):
    """``state_dict`` puts the open step's and the actions' states together
    (``gradscope.monitor.checkpoint``); a resumed monitor closed before its first step still
    closes its log with the checkpoint's step count, as it would after more steps."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, **options(opt)) as mon:
        train(model, opt, mon, range(6))
        state = mon.state_dict()
        assert state["step"] == 6 and set(state["actions"]) == {"early_stopping", "shared_stop", "lr"}
        assert checkpoint_format.parts_of(state) == (mon._open.state_dict(), mon._acting.state_dict())
    for log, steps in (("resumed", 0), ("resumed-then-two-steps", 2)):
        again = tiny_model()
        again_opt = torch.optim.SGD(again.parameters(), lr=0.1)
        with gradscope.watch(again, **options(again_opt), log_dir=tmp_path / log) as mon:
            mon.load_state_dict(roundtrip(state))
            train(again, again_opt, mon, range(6, 6 + steps))
        last = (tmp_path / log).glob("*.jsonl").__next__().read_text().splitlines()[-1]
        assert records.decode(last) == records.Closed(6 + steps)


def test_a_state_saved_without_the_actions_entry_resumes_a_monitor_that_acts():
    """``{"version": 1, "step": n}`` (the state of a monitor without actions, before the
    ``actions`` entry was always written) resumes the step count of a monitor that acts,
    whose actions start afresh."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stopping = gradscope.EarlyStopping(patience=3)
    with gradscope.watch(model, optimizer=opt, halt_on="nonfinite", early_stopping=stopping, backend="numpy") as mon:
        mon.load_state_dict({"version": 1, "step": 4})
        train(model, opt, mon, range(4, 6))
        assert list(mon.history("norm").steps) == [4, 5] and mon.errors == []
