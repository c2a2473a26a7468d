"""Which findings are new (``gradscope.actions.novelty``) and ``watch(..., on_finding=...)``.

``NewFindings`` is fed hand-built findings judgement by judgement: a finding is announced
the first time its identity is seen, again when its severity rises above every severity
announced for it, and again after it was absent from a judgement and comes back with a
``since_step`` after the last step it was seen at (a new episode); exploding findings of
different rules and plateaus of different metrics are distinct findings. Then real training
runs of the demo model: ``on_finding`` is called once per finding over 1000 steps, a callback
that raises does not stop training (one warning, every failure in ``mon.errors``), and a
callback that raises ``TrainingHalted`` halts the run.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch.nn import functional as F

import gradscope
from gradscope import demo
from gradscope.actions.novelty import NewFindings, identity
from gradscope.health.findings import Finding


def finding(kind="dead", layer="fc", step=10, since=0, severity="warning", **evidence) -> Finding:
    return Finding(kind, severity, layer, step, since, f"{kind} in {layer}", "fix it", evidence)


def keys(findings):
    return [(f.kind, f.layer, f.severity, f.since_step) for f in findings]


# --------------------------------------------------------------------------------------
# NewFindings, judgement by judgement
# --------------------------------------------------------------------------------------


def test_a_new_finding_is_announced_once_while_it_persists():
    novelty = NewFindings()
    first = finding(step=10)
    assert novelty.update([first]) == [first]
    for step in (11, 20, 500):
        assert novelty.update([finding(step=step)]) == []


def test_findings_of_different_layers_and_kinds_are_each_new():
    novelty = NewFindings()
    a, b, c = finding(layer="a"), finding(layer="b"), finding(kind="vanishing", layer="a")
    assert novelty.update([a, b]) == [a, b]
    assert novelty.update([a, b, c]) == [c]


def test_evidence_that_does_not_distinguish_findings_does_not_make_a_new_one():
    novelty = NewFindings()
    assert len(novelty.update([finding(zero_frac=0.995)])) == 1
    assert novelty.update([finding(step=11, zero_frac=1.0)]) == []


def test_a_rising_severity_is_announced_and_a_falling_one_is_not():
    novelty = NewFindings()
    assert keys(novelty.update([finding(severity="info")])) == [("dead", "fc", "info", 0)]
    assert keys(novelty.update([finding(step=11, severity="warning")])) == [("dead", "fc", "warning", 0)]
    assert keys(novelty.update([finding(step=12, severity="critical")])) == [("dead", "fc", "critical", 0)]
    assert novelty.update([finding(step=13, severity="warning")]) == []
    assert novelty.update([finding(step=14, severity="critical")]) == []  # critical was announced already


def test_a_finding_that_ends_and_comes_back_later_is_a_new_episode():
    novelty = NewFindings()
    assert len(novelty.update([finding(step=10, since=0, severity="critical")])) == 1
    assert novelty.update([]) == []  # gone at this judgement
    back = finding(step=30, since=25, severity="warning")
    assert novelty.update([back]) == [back]  # a new episode: announced even at a lower severity
    assert novelty.update([finding(step=31, since=25, severity="critical")]) != []  # and can rise again


def test_a_finding_absent_from_one_judgement_with_the_same_start_is_not_new():
    novelty = NewFindings()
    assert len(novelty.update([finding(step=10, since=3)])) == 1
    assert novelty.update([finding(layer="other")]) != []
    assert novelty.update([finding(step=20, since=3)]) == []  # the same problem, judged again


def test_a_finding_back_with_a_start_no_later_than_it_was_last_seen_is_not_new():
    """A rolling window can move ``since_step`` forward; only a start after the last step the
    finding was seen at proves the problem ended in between."""
    novelty = NewFindings()
    assert len(novelty.update([finding(step=10, since=0)])) == 1
    assert novelty.update([]) == []
    assert novelty.update([finding(step=40, since=10)]) == []
    assert novelty.update([]) == []
    assert len(novelty.update([finding(step=60, since=41)])) == 1


def test_a_finding_present_at_every_judgement_is_never_new_again_whatever_its_start():
    novelty = NewFindings()
    assert len(novelty.update([finding(step=10, since=0)])) == 1
    assert novelty.update([finding(step=100, since=90)]) == []


def test_exploding_by_ceiling_spike_and_trend_are_three_findings():
    ceiling = finding("exploding", layer="l1", ceiling=10.0, rms={"l1": 100.0})
    spike = finding("exploding", layer="l1", spike_steps=[7], median=0.1)
    trend = finding("exploding", layer="l1", growth=500.0)
    assert len({identity(ceiling), identity(spike), identity(trend)}) == 3
    novelty = NewFindings()
    assert novelty.update([ceiling, spike, trend]) == [ceiling, spike, trend]
    assert novelty.update([finding("exploding", layer="l1", step=12, spike_steps=[7, 11])]) == []


def test_plateaus_of_two_metrics_are_two_findings():
    loss = finding("plateau", layer=None, severity="info", metric="loss")
    val = finding("plateau", layer=None, severity="info", metric="val_loss")
    novelty = NewFindings()
    assert novelty.update([loss]) == [loss]
    assert novelty.update([loss, val]) == [val]
    assert novelty.update([finding("plateau", layer=None, step=50, severity="info", metric="loss"), val]) == []


def test_one_identity_twice_in_a_judgement_is_announced_once():
    novelty = NewFindings()
    first, second = finding(step=10), finding(step=10, severity="critical")
    assert novelty.update([first, second]) == [first]


# --------------------------------------------------------------------------------------
# on_finding in real training runs
# --------------------------------------------------------------------------------------


def train_demo(fault, steps, batch=32, nan_at=(), clock=None, catch_halts=False, **watch_options):
    """Train the demo model with ``fault`` under ``gradscope.watch``; at the steps ``nan_at``
    blocks.4 computes where(x > 0, sqrt(x), 0), whose backward is NaN. Steps whose gradients
    are not finite skip ``opt.step()``, so the weights stay finite. ``clock``, a list, gets
    each step appended before its ``mon.step()``; ``catch_halts``: a ``TrainingHalted`` skips
    the step's update and training goes on. Returns the closed monitor."""
    model = demo.build(fault)
    task = demo.SyntheticTask()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradscope.watch(model, optimizer=opt, **watch_options) as mon:
        for step in range(steps):
            model.blocks[4].activation = "where_sqrt" if step in nan_at else "relu"
            x, y = task.batch(batch)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if clock is not None:
                clock.append(step)
            try:
                mon.step(loss=loss.detach())
            except gradscope.TrainingHalted:
                if not catch_halts:
                    raise
                opt.zero_grad()
                continue
            if all(torch.isfinite(p.grad).all() for p in model.parameters()):
                opt.step()
            opt.zero_grad()
    return mon


def test_on_finding_is_called_exactly_once_per_finding_across_1000_steps():
    """blocks.3 of the demo model is dead from the start and starves every layer before it:
    the dead findings persist for 1000 steps, judged again and again, and are each announced
    once. (A plateau may end and begin again: a new episode, announced again.)"""
    calls = []
    mon = train_demo("dead", 1000, on_finding=calls.append)
    assert mon.step_index == 1000 and mon.errors == []
    by_identity = {}
    for f in calls:
        by_identity.setdefault(identity(f), []).append(f)
    for key, announced in by_identity.items():
        # Announced again only when its severity rose, or when it had ended and came back.
        for before, after in itertools.pairwise(announced):
            assert after.severity_level > before.severity_level or after.since_step > before.step, (
                key,
                keys(announced),
            )
    starved = ["input", "blocks.0.linear", "blocks.1.linear", "blocks.2.linear", "blocks.3.linear"]
    for layer in starved:
        assert len(by_identity.get(identity(finding(layer=layer)), [])) == 1, (layer, keys(calls))
    dead = by_identity[identity(finding(layer="blocks.3.linear"))][0]
    assert (dead.kind, dead.layer, dead.severity) == ("dead", "blocks.3.linear", "warning")
    # It persisted to the end: the final report still holds it, judged at the last step.
    (final,) = [f for f in mon.report().findings if identity(f) == identity(dead)]
    assert final.step == 999 and dead.step < 999


def test_a_nan_gradient_is_announced_at_its_own_step_and_once():
    calls, clock = [], []
    train_demo("nan", 30, nan_at=range(12, 16), clock=clock, on_finding=lambda f: calls.append((clock[-1], f)))
    nonfinite = [(at, f) for at, f in calls if f.kind == "nonfinite"]
    assert len(nonfinite) == 1, [(at, f.message) for at, f in nonfinite]
    at, f = nonfinite[0]
    assert (f.layer, f.since_step, at) == ("blocks.4.linear", 12, 12)


def test_a_callback_that_raises_does_not_stop_training():
    """blocks.3 is dead from the start (six dead findings) and a NaN at step 20 makes the
    monitor judge at once: the callback fails for every finding, training runs to the end."""
    calls = []

    def callback(f):
        calls.append(f)
        raise ValueError(f"callback bug on {f.kind}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = train_demo("dead", 40, nan_at=(20,), on_finding=callback)
    assert mon.step_index == 40
    assert len(calls) >= 2 and {"dead", "nonfinite"} <= {f.kind for f in calls}
    failures = [e for e in mon.errors if "on_finding" in e]
    assert len(failures) == len(calls)
    assert all("ValueError: callback bug on" in e for e in failures)
    about = [w for w in caught if issubclass(w.category, RuntimeWarning) and "on_finding" in str(w.message)]
    assert len(about) == 1
    assert mon.halted is None


def test_a_callback_that_raises_training_halted_halts_the_run():
    raised = []

    def callback(f):
        if f.kind == "nonfinite":
            raised.append(gradscope.TrainingHalted(f, None, -1))
            raise raised[-1]

    model = demo.build("nan")
    task = demo.SyntheticTask()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradscope.watch(model, optimizer=opt, on_finding=callback) as mon:
        for step in range(20):
            if step == 9:
                model.blocks[4].activation = "where_sqrt"
            x, y = task.batch(32)
            F.cross_entropy(model(x), y).backward()
            if step < 9:
                mon.step()
                opt.step()
                opt.zero_grad()
                continue
            with pytest.raises(gradscope.TrainingHalted) as halted:
                mon.step()
            break
    assert step == 9 and len(raised) == 1
    assert halted.value is raised[0] and mon.halted is raised[0]
    assert [a["action"] for a in mon.report().actions] == ["halt"]
    assert mon.errors == []


def test_findings_new_in_the_judgement_that_halts_are_still_passed_to_on_finding():
    """blocks.3 is dead from step 0; the dead check needs 5 sampled steps, so the dead findings
    are first judged at step 4, where a NaN gradient (an alarm: judged at once) halts the run.
    The loop catches the halt and trains on; the dead findings persist to the end."""
    calls = []
    mon = train_demo("dead", 40, nan_at=(4,), catch_halts=True, on_finding=calls.append, halt_on="nonfinite")
    assert mon.halted is not None and mon.halted.step == 4
    announced = {(f.kind, f.layer) for f in calls}
    assert ("nonfinite", "blocks.4.linear") in announced
    starved = ["input", "blocks.0.linear", "blocks.1.linear", "blocks.2.linear", "blocks.3.linear"]
    reported = {(f.kind, f.layer) for f in mon.report().findings}
    assert {("dead", layer) for layer in starved} <= reported
    assert {("dead", layer) for layer in starved} <= announced, sorted(announced)


def test_without_on_finding_or_halt_on_the_monitor_only_reports():
    mon = train_demo("nan", 10, nan_at=(5,))
    assert mon.halted is None and mon.should_stop is False and mon.best_step is None
    assert mon.report().actions == ()
    assert [f.kind for f in mon.report().findings if f.kind == "nonfinite"] == ["nonfinite"]
