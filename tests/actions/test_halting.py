"""Halting a run on a finding: ``watch(..., halt_on=...)`` and ``gradscope.TrainingHalted``.

Validation of ``halt_on`` (unknown names, ``"info"``, non-strings), which findings a rule
matches, and real training of the demo model with a NaN fault (blocks.4 computes
``torch.where(x > 0, sqrt(x), 0)`` from step k, whose backward is NaN in blocks.4.linear and
every layer below it): ``mon.step()`` raises at step k itself on CPU, in both watch modes,
and at the next sampled step with ``every=3``; the optimizer never applies the NaN gradients;
a loop that catches the exception and goes on is not halted again for the same finding; a
rule that does not match never halts; the exception pickles.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

import gradscope
from gradscope import demo
from gradscope.actions.halting import HaltRule
from gradscope.health.findings import KINDS, Finding


def finding(kind="dead", severity="warning", layer="fc") -> Finding:
    return Finding(kind, severity, layer, 5, 3, f"{kind} in {layer}", "fix it", {})


# --------------------------------------------------------------------------------------
# halt_on: validation and matching
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "exploding_gradients", "fatal", ["nonfinite", "Critical"]])
def test_an_unknown_halt_on_name_is_a_value_error_naming_it(bad):
    name = bad if isinstance(bad, str) else bad[1]
    with pytest.raises(ValueError, match=f"'{name}'"):
        gradscope.watch(torch.nn.Linear(2, 1), halt_on=bad)


def test_halt_on_info_is_refused():
    with pytest.raises(ValueError, match="info"):
        gradscope.watch(torch.nn.Linear(2, 1), halt_on="info")
    with pytest.raises(ValueError, match="info"):
        gradscope.watch(torch.nn.Linear(2, 1), halt_on=["nonfinite", "info"])


@pytest.mark.parametrize("bad", [3, [b"nonfinite"], ["nonfinite", None], b"nonfinite"])
def test_halt_on_entries_that_are_not_strings_are_a_type_error(bad):
    with pytest.raises(TypeError, match="halt_on"):
        gradscope.watch(torch.nn.Linear(2, 1), halt_on=bad)


def test_a_refused_halt_on_leaves_the_model_free_to_watch():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError):
        gradscope.watch(model, halt_on="nope")
    with gradscope.watch(model, halt_on="nonfinite") as mon:
        assert mon.halted is None


def test_a_severity_matches_it_and_everything_above():
    warning = HaltRule.parse("warning")
    assert [warning.matches(finding(severity=s)) for s in ("info", "warning", "critical")] == [False, True, True]
    critical = HaltRule.parse(["critical"])
    assert [critical.matches(finding(severity=s)) for s in ("info", "warning", "critical")] == [False, False, True]
    assert HaltRule.parse(["critical", "warning"]).min_severity == "warning"


def test_a_kind_matches_that_kind_at_any_severity_and_no_other():
    rule = HaltRule.parse(("nonfinite", "plateau"))
    assert rule.matches(finding("plateau", "info", None))
    assert rule.matches(finding("nonfinite", "critical"))
    assert not rule.matches(finding("dead", "critical"))
    assert not rule.matches(finding("divergence", "critical", None))


def test_every_kind_is_accepted_and_nothing_halts_without_halt_on():
    for kind in KINDS:
        assert HaltRule.parse(kind).kinds == {kind}
    assert HaltRule.parse(None) is None and HaltRule.parse([]) is None


# --------------------------------------------------------------------------------------
# Real training: a NaN gradient from step k
# --------------------------------------------------------------------------------------


class NanRun:
    """The demo model trained with Adam; from step ``nan_from`` (until ``nan_until``, exclusive)
    blocks.4's activation is where(x > 0, sqrt(x), 0): its backward is NaN. On TrainingHalted
    the loop records it and stops (``stop=True``, gradients left in place) or skips
    ``opt.step()`` and goes on. ``guard=True``: it also skips ``opt.step()`` whenever a
    gradient is not finite (otherwise it counts the steps that applied one)."""

    def __init__(self, nan_from: int, nan_until: int = 10**9, **watch_options) -> None:
        self.nan_from, self.nan_until = nan_from, nan_until
        self.model = demo.build("nan")
        self.task = demo.SyntheticTask()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.mon = gradscope.watch(self.model, optimizer=self.opt, **watch_options)
        self.halts: list[tuple[int, gradscope.TrainingHalted]] = []
        self.nonfinite_grads_applied = 0

    def train(self, steps: int, stop: bool = False, guard: bool = False) -> NanRun:
        with self.mon:
            for step in range(steps):
                faulty = self.nan_from <= step < self.nan_until
                self.model.blocks[4].activation = "where_sqrt" if faulty else "relu"
                x, y = self.task.batch(32)
                loss = F.cross_entropy(self.model(x), y)
                loss.backward()
                try:
                    self.mon.step(loss=loss.detach())
                except gradscope.TrainingHalted as halted:
                    self.halts.append((step, halted))
                    if stop:
                        break
                    self.opt.zero_grad()
                    continue
                if not all(torch.isfinite(p.grad).all() for p in self.model.parameters()):
                    if guard:
                        self.opt.zero_grad()
                        continue
                    self.nonfinite_grads_applied += 1  # nothing halted this step
                self.opt.step()
                self.opt.zero_grad()
        return self

    def weights_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.model.parameters())


@pytest.mark.parametrize("mode", ["backward", "step"])
def test_a_nan_gradient_halts_training_at_its_own_step(mode):
    run = NanRun(nan_from=7, halt_on="nonfinite", mode=mode).train(20, stop=True)
    ((step, halted),) = run.halts
    assert step == 7 and halted.step == 7
    assert (halted.finding.kind, halted.finding.layer) == ("nonfinite", "blocks.4.linear")
    assert halted.finding.since_step == 7 and halted.finding.severity == "critical"
    assert "blocks.4.linear" in str(halted) and "step 7" in str(halted)
    # Raised before opt.step(): the NaN gradients are there, and never reached the weights.
    assert not torch.isfinite(run.model.blocks[4].linear.weight.grad).all()
    assert not torch.isfinite(run.model.input.weight.grad).all()
    assert run.weights_finite() and run.nonfinite_grads_applied == 0
    assert run.mon.halted is halted


def test_broken_health_checks_do_not_make_halt_on_a_nan_lapse(monkeypatch):
    """A bug in gradscope's checks must not silently end the halting the user asked for: it is
    reported (one warning, mon.errors), and a NaN that arrives still halts at its own step,
    with a plain finding (the layer cannot be named without the checks)."""
    from gradscope.actions import responder

    def broken(view, thresholds):
        raise ZeroDivisionError("a check's bug")

    monkeypatch.setattr(responder, "judge", broken)
    with pytest.warns(gradscope.GradscopeWarning, match="acting on findings failed"):
        run = NanRun(nan_from=7, halt_on="nonfinite").train(20, stop=True)
    ((step, halted),) = run.halts
    assert step == 7 and halted.step == 7
    assert (halted.finding.kind, halted.finding.severity, halted.finding.layer) == ("nonfinite", "critical", None)
    assert halted.finding.since_step == 7 and "ZeroDivisionError" in halted.finding.message
    assert halted.report is None
    assert run.weights_finite() and run.nonfinite_grads_applied == 0
    assert any("acting on findings failed" in e for e in run.mon.errors)


def test_broken_health_checks_do_not_halt_a_healthy_run(monkeypatch):
    """...and they never halt a run that has no NaN: gradscope's own failure does not stop training."""
    from gradscope.actions import responder

    monkeypatch.setattr(responder, "judge", lambda view, thresholds: 1 / 0)
    with pytest.warns(gradscope.GradscopeWarning, match="acting on findings failed"):
        run = NanRun(nan_from=10**6, halt_on="nonfinite").train(12)
    assert run.halts == []


def test_the_halt_carries_the_report_and_is_recorded_as_an_action():
    run = NanRun(nan_from=5, halt_on=["nonfinite", "divergence"]).train(10, stop=True)
    ((_, halted),) = run.halts
    assert halted.report.status == "critical"
    assert halted.finding in halted.report.findings
    (action,) = run.mon.report().actions
    assert action["action"] == "halt" and action["step"] == 5
    assert action["detail"]["because"] == {"kind": "nonfinite", "layer": "blocks.4.linear", "step": 5}


@pytest.mark.parametrize(("mode", "nan_from"), [("backward", 4), ("backward", 7), ("step", 5), ("step", 6)])
def test_with_every_3_a_nan_on_an_unsampled_step_halts_at_the_next_sampled_step(mode, nan_from):
    run = NanRun(nan_from=nan_from, halt_on="nonfinite", mode=mode, every=3).train(20, stop=True)
    ((step, halted),) = run.halts
    sampled = -(-nan_from // 3) * 3  # the next multiple of 3
    assert step == halted.step == sampled
    assert (halted.finding.layer, halted.finding.since_step) == ("blocks.4.linear", sampled)
    # Steps between nan_from and the sampled step applied NaN gradients (nothing saw them):
    # every=3 trades that for speed.
    assert run.nonfinite_grads_applied == sampled - nan_from


def test_halt_on_critical_halts_on_a_nan_gradient():
    run = NanRun(nan_from=3, halt_on="critical").train(8, stop=True)
    ((step, halted),) = run.halts
    assert step == 3 and halted.finding.kind == "nonfinite"


def test_catching_the_halt_and_going_on_does_not_halt_again_for_the_same_finding():
    """The NaN lasts from step 5 to step 24; the loop catches the halt, skips the update of
    every step whose gradient is not finite, and trains on."""
    run = NanRun(nan_from=5, nan_until=25, halt_on="nonfinite").train(40, guard=True)
    assert [step for step, _ in run.halts] == [5]
    assert run.mon.halted is run.halts[0][1]
    assert run.mon.step_index == 40 and run.weights_finite()
    (nonfinite,) = [f for f in run.mon.report().findings if f.kind == "nonfinite"]
    assert (nonfinite.layer, nonfinite.since_step) == ("blocks.4.linear", 5)
    assert [a["action"] for a in run.mon.report().actions] == ["halt"]


def test_a_loop_that_applies_the_nan_after_a_caught_halt_is_halted_again_by_the_new_finding():
    """Going on after the halt without skipping updates writes NaN into the weights below
    blocks.4 (whose where() hides them from the loss); when blocks.4 is a ReLU again, at step
    25, the loss is NaN: a different finding, which halts again."""
    run = NanRun(nan_from=5, nan_until=25, halt_on="nonfinite").train(40)
    assert [step for step, _ in run.halts] == [5, 25], [str(h) for _, h in run.halts]
    assert run.nonfinite_grads_applied == 19 + 14  # steps 6..24, and 26..39 (NaN weights from then on)
    second = run.halts[1][1].finding
    assert (second.kind, second.layer, second.since_step) == ("nonfinite", None, 25)
    assert "loss is nan" in second.message
    assert run.mon.halted is run.halts[1][1] and not run.weights_finite()


def test_a_rule_that_matches_no_finding_never_halts():
    run = NanRun(nan_from=5, nan_until=8, halt_on="vanishing").train(15)
    assert run.halts == [] and run.mon.halted is None
    assert run.mon.step_index == 15
    assert any(f.kind == "nonfinite" for f in run.mon.report().findings)
    assert run.mon.report().actions == ()


def test_a_healthy_run_is_not_halted():
    run = NanRun(nan_from=10**9, halt_on=["warning"]).train(40)
    assert run.halts == [] and run.mon.halted is None and run.weights_finite()


def test_training_halted_pickles_with_its_message_finding_and_step():
    run = NanRun(nan_from=4, halt_on="nonfinite").train(6, stop=True)
    ((_, halted),) = run.halts
    copy = pickle.loads(pickle.dumps(halted))
    assert type(copy) is gradscope.TrainingHalted and isinstance(copy, RuntimeError)
    assert str(copy) == str(halted) and copy.args == halted.args
    assert copy.step == 4 and copy.finding == halted.finding
    assert copy.report.status == halted.report.status
    assert [f.kind for f in copy.report.findings] == [f.kind for f in halted.report.findings]


def test_a_hand_made_training_halted_names_the_finding():
    f = Finding("divergence", "critical", None, 90, 40, "the loss is rising", "lower the lr", {"loss": math.inf})
    halted = gradscope.TrainingHalted(f, None, 91)
    assert str(halted).startswith("gradscope halted training at step 91: [critical] divergence (since step 40)")
    copy = pickle.loads(pickle.dumps(halted))
    assert str(copy) == str(halted) and copy.report is None and copy.step == 91


def test_a_failed_exchange_between_ranks_does_not_make_halt_on_a_nan_lapse(tmp_path):
    """Distributed, the deciding rank's halt reaches the others through a broadcast. When that
    broadcast fails (here the process group is destroyed under the monitor), the failure is
    reported, and the rank's own halt still stops training before the NaN's update."""
    from gradscope.actions.consensus import Consensus

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    run = NanRun(nan_from=5, halt_on="nonfinite")
    responder = run.mon._acting.responder
    responder.consensus = Consensus(0, len(run.mon.rows))  # as a 2-rank run builds it, with this rank deciding
    original = run.model.blocks[4].forward

    def destroy_the_group_at_the_nan(*args, **kwargs):
        if run.model.blocks[4].activation != "relu" and dist.is_initialized():
            dist.destroy_process_group()
        return original(*args, **kwargs)

    run.model.blocks[4].forward = destroy_the_group_at_the_nan
    try:
        with pytest.warns(gradscope.GradscopeWarning, match="sharing a decision between ranks failed"):
            run.train(12, stop=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    ((step, halted),) = run.halts
    assert step == 5 and halted.finding.kind == "nonfinite"
    assert run.weights_finite() and run.nonfinite_grads_applied == 0
    assert any("sharing a decision between ranks failed" in e for e in run.mon.errors)
