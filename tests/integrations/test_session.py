"""``TrainerSession``: what every trainer callback does at each event, without a trainer.

A plain loop plays the trainer: the session watches, steps, takes evaluations, hands out the
scalars for the loggers (only steps not handed out before), raises a halt on before the
optimizer step and turns early stopping into a stop reason, numbers steps from a resumed
count, and writes its reports at the end.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope.integrations.session import TrainerSession, check_watch_options, finite_scalars, new_run_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_opt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def one_step(session, model, opt, step, nan=False):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
    loss = model(x).square().mean() * (float("nan") if nan else 1.0)
    loss.backward()
    reason = session.step(loss.detach())
    opt.step()
    opt.zero_grad()
    return reason


def test_options_are_checked_by_name():
    assert check_watch_options("Cb", {"every": 3}) == {"every": 3}
    with pytest.raises(TypeError, match="unknown option 'evry'"):
        check_watch_options("Cb", {"evry": 3})
    for name in ("mode", "scaler", "accumulation_steps"):
        with pytest.raises(ValueError, match=f"Cb: {name}= is set from the trainer"):
            check_watch_options("Cb", {name: None})
    with pytest.raises(TypeError, match="log_layers and report"):
        TrainerSession("Cb", {}, log_layers="yes")


def test_finite_scalars_keep_numbers_and_one_element_tensors():
    metrics = {"a": 1, "b": torch.tensor([2.5]), "c": "text", "d": float("nan"), "e": torch.ones(2), "f": True}
    assert finite_scalars(metrics) == {"a": 1.0, "b": 2.5}


def test_run_dirs_are_new(tmp_path):
    first = new_run_dir(tmp_path)
    first.mkdir()
    second = new_run_dir(tmp_path)
    assert second != first and not second.exists() and second.parent == tmp_path


def test_scalars_hand_out_each_sampled_step_once(tmp_path):
    model, opt = model_and_opt()
    session = TrainerSession("Cb", {"every": 2, "backend": "numpy"}, log_layers=True, report=False)
    session.start(model, tmp_path, optimizer=opt, mode="step")
    assert session.scalars() is None
    one_step(session, model, opt, 0)
    step, values = session.scalars()
    norms = session.monitor.history("norm").values[-1]
    assert step == 0
    assert values["gradscope/grad_norm"] == pytest.approx(math.sqrt(float((norms**2).sum())), rel=1e-12)
    assert values["grad_norm/0"] == pytest.approx(norms[0]) and values["grad_norm/2"] == pytest.approx(norms[1])
    assert session.scalars() is None  # nothing new
    one_step(session, model, opt, 1)
    assert session.scalars() is None  # step 1 is not sampled
    one_step(session, model, opt, 2)
    assert session.scalars()[0] == 2
    session.finish("t")


def test_evaluations_reach_the_monitor_without_trainer_bookkeeping(tmp_path):
    model, opt = model_and_opt()
    session = TrainerSession("Cb", {"backend": "numpy"}, report=False)
    session.start(model, tmp_path, optimizer=opt, mode="step")
    one_step(session, model, opt, 0)
    session.evaluated({"eval_loss": 0.5, "eval_runtime": 3.0, "eval_samples_per_second": 9.0, "epoch": 1.0, "loss": 2})
    assert "eval_loss" in session.monitor.fields()
    assert not {"eval_runtime", "eval_samples_per_second", "epoch"} & set(session.monitor.fields())
    np.testing.assert_array_equal(session.monitor.history("eval_loss").values, [0.5])
    session.finish("t")


def test_a_halt_is_raised_before_the_optimizer_step_with_a_stop_reason(tmp_path):
    model, opt = model_and_opt()
    session = TrainerSession("Cb", {"halt_on": "nonfinite", "backend": "numpy"}, report=False)
    session.start(model, tmp_path, optimizer=opt, mode="step")
    assert one_step(session, model, opt, 0) is None
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gradscope.TrainingHalted) as halted:
        one_step(session, model, opt, 1, nan=True)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))  # opt.step never ran
    reason = session.stop_reason
    assert reason is not None and "nonfinite" in reason and str(halted.value) in reason
    assert halted.value is session.monitor.halted
    opt.zero_grad()
    assert one_step(session, model, opt, 2) == reason  # a caller that goes on: not halted again, same reason
    session.finish("t")


def test_summed_losses_are_shares_of_the_steps_loss(tmp_path):
    model, _ = model_and_opt()
    session = TrainerSession("Cb", {"backend": "numpy"}, report=False)
    session.start(model, tmp_path, mode="step")
    for summed, scale in ((False, 1.0), (True, 1.0), (False, 3.0)):
        model(torch.randn(2, 4)).sum().backward()
        for value in (0.25, 0.5, 2.0):
            session.add_loss(torch.tensor(value))
        session.step(summed=summed, loss_scale=scale)
    np.testing.assert_allclose(session.monitor.history("loss").values, [2.75 / 3, 2.75, 2.75])
    session.finish("t")


def test_early_stopping_becomes_a_stop_reason(tmp_path):
    model, opt = model_and_opt()
    stop = gradscope.EarlyStopping(metric="eval_loss", patience=2)
    session = TrainerSession("Cb", {"early_stopping": stop, "backend": "numpy"}, report=False)
    session.start(model, tmp_path, optimizer=opt, mode="step")
    reasons = []
    for step, value in enumerate([1.0, 0.5, 0.6, 0.7, 0.8]):
        one_step(session, model, opt, step)
        reasons.append(session.evaluated({"eval_loss": value}))
    assert reasons[:3] == [None, None, None]
    assert "early stopping" in reasons[3] and "best step 1" in reasons[3]
    session.finish("t")


def test_steps_are_numbered_from_the_resumed_count_and_reports_written(tmp_path, capsys):
    model, opt = model_and_opt()
    session = TrainerSession("Cb", {"backend": "numpy"})
    session.start(model, tmp_path, optimizer=opt, mode="step")
    session.begin_at(40)
    for step in range(3):
        one_step(session, model, opt, step)
    assert list(session.monitor.history("norm").steps) == [40, 41, 42]
    files = session.finish("title")
    assert session.run_dir.parent == tmp_path
    assert [f.name for f in files] == ["report.txt", "report.html"]
    assert (session.run_dir / "report.txt").read_text() == str(session.monitor.report()) + "\n"
    assert "gradscope health" in capsys.readouterr().out
    assert gradscope.load_run(session.run_dir).history("norm").steps.tolist() == [40, 41, 42]
    assert session.finish("title") == files  # once only


def test_statistics_the_loggers_cannot_read_are_reported_and_training_goes_on(tmp_path, monkeypatch):
    """A failure while turning the statistics into logger scalars (a gradscope bug) reaches
    ``mon.errors`` and one warning; the logger gets nothing for that step, the step goes on,
    and the next step's scalars arrive as usual."""
    from gradscope.integrations import session as session_module

    model, opt = model_and_opt()
    session = TrainerSession("Cb", {"backend": "numpy"}, report=False)
    session.start(model, tmp_path, optimizer=opt, mode="step")
    one_step(session, model, opt, 0)
    with monkeypatch.context() as patch:
        patch.setattr(session_module, "summary_scalars", lambda rows, present: 1 / 0)
        with pytest.warns(gradscope.GradscopeWarning, match="could not read the statistics for the loggers"):
            assert session.scalars() is None
    assert any("division by zero" in e for e in session.monitor.errors)
    one_step(session, model, opt, 1)
    assert session.scalars()[0] == 1
    session.finish("t")


def test_a_report_that_cannot_be_written_is_a_warning_and_the_report_is_still_printed(tmp_path, capsys):
    model, opt = model_and_opt()
    session = TrainerSession("Cb", {"backend": "numpy"})
    session.start(model, tmp_path, optimizer=opt, mode="step")
    one_step(session, model, opt, 0)
    (session.run_dir / "report.txt").mkdir(parents=True)  # writing the text report fails (IsADirectoryError)
    with pytest.warns(gradscope.GradscopeWarning, match=r"Cb: could not write the health report \(.*report.txt"):
        assert session.finish("t") == []
    assert "gradscope health" in capsys.readouterr().out
