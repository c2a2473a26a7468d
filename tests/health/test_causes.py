"""``gradscope.health.causes``: each causal rule, chains resolved to their root, the causal order,
no finding its own cause, causes set by checks kept, and learning-rate increases read from
logged metrics; on runs fed record by record to a ``RunState`` and judged by the real checks,
and on findings built by hand over a real ``RunView``."""

import json

import numpy as np
import pytest
import run_builders

from gradscope import Thresholds
from gradscope.health import causes
from gradscope.health.causes import LR_INCREASE, Rule, is_lr_metric, link, lr_increases
from gradscope.health.findings import Finding
from gradscope.health.report import assess
from gradscope.health.view import view_of
from gradscope.run import records
from gradscope.stats import layout

NAMES = ("a", "b", "c")


def sampled(step, nans=(0, 0, 0), zeros=(0, 0, 0)):
    """A sampled step over ``NAMES``: 10 elements per row, rms 0.1 over the finite non-zero ones."""
    rows = np.zeros((len(NAMES), layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = 10
    rows[:, layout.NANS] = nans
    rows[:, layout.ZEROS] = zeros
    rows[:, layout.SUMSQ] = 0.01 * (10 - rows[:, layout.NANS] - rows[:, layout.ZEROS])
    rows[:, layout.MAX_ABS] = 0.1
    return records.Sampled(step, rows, np.ones(len(NAMES), dtype=bool), np.array([2, 1, 0]))


def nan_run(nan_from=30, jump_at=31, dead_from=None, steps=100):
    """The loss falls from 2.0 by 0.01 a step and jumps to 3.0 at ``jump_at``; from ``nan_from``
    the gradient of 'b' is all NaN; from ``dead_from`` that of 'c' is all zeros."""
    state = run_builders.run_state(NAMES, numel=10)
    for step in range(steps):
        state.apply(records.StepValues(step, {"loss": 3.0 if step >= jump_at else 2.0 - step / 100}))
        nans = (0, 10 if step >= nan_from else 0, 0)
        zeros = (0, 0, 10 if dead_from is not None and step >= dead_from else 0)
        state.apply(sampled(step, nans, zeros))
    return state


def quiet_view(steps=200, metrics=None):
    """The view of a run with a flat loss of 1.0 over ``steps`` steps and ``metrics``
    (name -> {step: value}) logged with ``mon.log``."""
    state = run_builders.run_state(NAMES, numel=10)
    for step in range(steps):
        state.apply(records.StepValues(step, {"loss": 1.0}))
        state.apply(sampled(step))
    for name, values in (metrics or {}).items():
        for step, value in values.items():
            state.apply(records.Metrics(step, {name: value}))
    return view_of(state, Thresholds())


def finding(kind, since, *, severity="warning", layer=None, step=None, layers=(), evidence=None, cause=None):
    return Finding(
        kind=kind,
        severity=severity,
        layer=layer,
        step=since if step is None else step,
        since_step=since,
        message=f"{kind} since {since}",
        suggestion=f"fix {kind}",
        evidence=evidence or {},
        layers=layers,
        cause=cause,
    )


def cause_of(f):
    return {"kind": f.kind, "layer": f.layer, "step": f.since_step}


def divergence(best_step, best=1.0, latest=3.0, step=199):
    return finding(
        "divergence",
        best_step,
        severity="critical",
        step=step,
        evidence={"loss": latest, "best": best, "best_step": best_step, "pattern": "jump"},
    )


def by_kind(found):
    return {f.kind: f for f in found}


# --------------------------------------------------------------------------------------
# The rules, on runs judged by the real checks
# --------------------------------------------------------------------------------------


def test_a_nan_explains_the_loss_jump_and_the_dead_layer_after_it():
    report = assess(nan_run(dead_from=40), Thresholds())
    assert [f.kind for f in report.findings] == ["nonfinite", "divergence", "dead"], str(report)
    nan, diverged, dead = report.findings
    assert (nan.layer, nan.since_step, nan.cause) == ("b", 30, None)
    assert diverged.since_step == 30 and diverged.cause == {"kind": "nonfinite", "layer": "b", "step": 30}
    assert dead.layer == "c" and dead.since_step >= 40 and dead.cause == diverged.cause
    assert report.root_causes == (nan,)
    assert json.loads(report.to_json())["findings"][1]["cause"] == {"kind": "nonfinite", "layer": "b", "step": 30}


@pytest.mark.parametrize(
    ("nan_from", "why"),
    [(10, "the loss kept improving for 20 steps after the NaN"), (60, "the loss had jumped 29 steps before it")],
)
def test_a_nan_that_did_not_start_the_loss_rise_does_not_explain_it(nan_from, why):
    report = assess(nan_run(nan_from=nan_from), Thresholds())
    found = by_kind(report.findings)
    assert found["nonfinite"].since_step == nan_from
    assert found["divergence"].cause is None, why
    assert report.root_causes == report.findings


def test_a_layer_dead_before_the_nan_is_its_own_problem():
    report = assess(nan_run(nan_from=95, jump_at=1000, dead_from=0), Thresholds())
    found = by_kind(report.findings)
    assert found["dead"].since_step < 95 and found["dead"].cause is None


# --------------------------------------------------------------------------------------
# The rules, on findings built by hand
# --------------------------------------------------------------------------------------


def test_a_divergence_after_a_nan_and_an_explosion_is_the_nans():
    view = quiet_view()
    exploding = finding("exploding", 100, layer="a")
    nan = finding("nonfinite", 100, severity="critical", layer="a")  # not strictly after: unrelated
    found = link([exploding, nan, divergence(100)], view, Thresholds())
    assert by_kind(found)["divergence"].cause == cause_of(nan)
    assert by_kind(found)["nonfinite"].cause is None
    found = link([exploding, divergence(100)], view, Thresholds())
    assert by_kind(found)["divergence"].cause == cause_of(exploding)


def test_a_divergence_needs_its_cause_between_its_best_step_and_its_latest_step():
    view = quiet_view()  # the loss never left 1.0: the halfway test always passes
    for at, linked in ((99, False), (100, True), (199, True), (200, False)):
        nan = finding("nonfinite", at, severity="critical", layer="a")
        found = by_kind(link([nan, divergence(100)], view, Thresholds()))
        assert (found["divergence"].cause is not None) == linked, at


def test_underfitting_is_explained_only_by_a_cause_before_its_starting_loss_was_measured():
    view = quiet_view()
    underfit = finding("underfitting", 0, step=199)
    t = Thresholds(smooth=9)
    for at, linked in ((8, True), (9, False)):
        nan = finding("nonfinite", at, severity="critical", layer="a")
        assert (by_kind(link([nan, underfit], view, t))["underfitting"].cause is not None) == linked, at


@pytest.mark.parametrize("kind", ["dead", "vanishing", "stalled_updates"])
def test_a_layer_starved_after_a_nan_is_its_consequence(kind):
    view = quiet_view()
    nan = finding("nonfinite", 30, severity="critical", layer="b")
    for since, linked in ((29, False), (30, True), (80, True)):
        effect = finding(kind, since, layer="c")
        found = by_kind(link([effect, nan], view, Thresholds()))
        assert found[kind].cause == (cause_of(nan) if linked else None), since


def test_a_nan_after_an_explosion_that_began_strictly_earlier():
    view = quiet_view()
    nan = finding("nonfinite", 40, severity="critical", layer="a")
    for since, linked in ((39, True), (40, False), (41, False)):
        exploding = finding("exploding", since, layer="a")
        found = by_kind(link([nan, exploding], view, Thresholds()))
        assert found["nonfinite"].cause == (cause_of(exploding) if linked else None), since
        assert found["exploding"].cause is None


def test_a_dead_layer_an_underflow_names():
    view = quiet_view()
    underflow = finding("underflow", 10, layer="a", layers=("a", "b"))
    dead_b, dead_c = finding("dead", 20, layer="b"), finding("dead", 20, layer="c")
    early = finding("dead", 5, layer="a")  # named, but dead before the underflow began
    found = link([dead_b, dead_c, early, underflow], view, Thresholds())
    causes_of = {f.layer: f.cause for f in found if f.kind == "dead"}
    assert causes_of == {"b": cause_of(underflow), "c": None, "a": None}


# --------------------------------------------------------------------------------------
# Learning-rate increases
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lr", "learning_rate", "LR", "lr_group0", "lr/head", "optim/lr", "head_lr"])
def test_names_read_as_learning_rates(name):
    assert is_lr_metric(name)


@pytest.mark.parametrize("name", ["val_loss", "lrs", "clr", "flr_x", "learning_rate_scale"])
def test_names_not_read_as_learning_rates(name):
    assert not is_lr_metric(name)


def test_learning_rate_increases_of_two_times_or_more():
    view = quiet_view(metrics={"lr": {0: 0.0, 5: 1e-4, 10: 1.9e-4, 20: 4e-4, 30: 1e-4}, "loss_lr": {40: 1.0, 41: 2.0}})
    assert lr_increases(view) == [5, 20, 41]  # 0 -> 1e-4 at 5; 1.9x at 10 is not; 2.1x at 20; a drop at 30


def test_an_explosion_soon_after_the_learning_rate_doubled():
    view = quiet_view(metrics={"lr": {0: 1e-3, 40: 1e-3, 60: 3e-3, 70: 6e-3}})
    t = Thresholds(spike_window=50)
    for since, increase in ((59, None), (60, 60), (69, 60), (70, 70), (120, 70), (121, None)):
        (found,) = link([finding("exploding", since)], view, t)
        expected = None if increase is None else {"kind": LR_INCREASE, "layer": None, "step": increase}
        assert found.cause == expected, since
    json.dumps(found.to_dict())


def test_an_explosion_after_a_learning_rate_increase_still_heads_what_it_caused():
    view = quiet_view(metrics={"learning_rate": {0: 1e-3, 50: 1e-2}})
    exploding = finding("exploding", 55, layer="a")
    nan = finding("nonfinite", 60, severity="critical", layer="a")
    found = link([nan, divergence(60), exploding], view, Thresholds())
    assert [f.kind for f in found] == ["exploding", "nonfinite", "divergence"]
    assert found[0].cause == {"kind": LR_INCREASE, "layer": None, "step": 50}
    assert found[1].cause == found[2].cause == cause_of(exploding)


# --------------------------------------------------------------------------------------
# Chains, order, causes already set, no self-cause
# --------------------------------------------------------------------------------------


def test_chains_resolve_to_the_root():
    view = quiet_view()
    exploding = finding("exploding", 10, layer="a")
    nan = finding("nonfinite", 20, severity="critical", layer="a")
    dead = finding("dead", 30, layer="c")
    found = link([dead, divergence(20), nan, exploding], view, Thresholds())
    assert [f.kind for f in found] == ["exploding", "nonfinite", "divergence", "dead"]
    assert found[0].cause is None
    assert all(f.cause == cause_of(exploding) for f in found[1:])


def test_roots_most_severe_first_each_followed_by_its_consequences():
    view = quiet_view()
    nan = finding("nonfinite", 20, severity="critical", layer="b")
    desync = finding("rank_desync", 50, severity="critical", layer="a")
    early_vanishing = finding("vanishing", 5, layer="a")  # before the NaN: a root of its own
    plateau = finding("plateau", 10, severity="info")
    dead = finding("dead", 40, layer="c")
    diverged = divergence(20)
    given = [plateau, dead, desync, early_vanishing, diverged, nan]
    found = link(given, view, Thresholds())
    assert [(f.kind, f.since_step) for f in found] == [
        ("nonfinite", 20),
        ("divergence", 20),
        ("dead", 40),
        ("rank_desync", 50),
        ("vanishing", 5),
        ("plateau", 10),
    ]
    assert found is not given and given[1].cause is None, "a new list; the findings given are unchanged"


def test_a_cause_a_check_set_is_kept_and_grouped_under_its_root():
    view = quiet_view()
    exploding = finding("exploding", 10, layer="a")
    nan = finding("nonfinite", 20, severity="critical", layer="a")
    dead = finding("dead", 30, layer="c", cause=cause_of(nan))  # a check named the NaN itself
    elsewhere = {"kind": "overflow", "layer": None, "step": 3}  # a cause not among the findings
    diverged = finding("divergence", 20, severity="critical", step=199, cause=elsewhere)
    found = link([dead, diverged, nan, exploding], view, Thresholds())
    assert [f.kind for f in found] == ["divergence", "exploding", "nonfinite", "dead"]
    assert found[0].cause == elsewhere  # not overwritten by the NaN rule; it heads its own group
    assert found[2].cause == cause_of(exploding)
    assert found[3].cause == cause_of(nan), "kept as the check set it, not resolved to the root"


def test_no_finding_is_its_own_cause(monkeypatch):
    rule = Rule(("exploding",), "exploding", causes._starts_at_or_after, "an explosion explains a later one")
    monkeypatch.setattr(causes, "RULES", (rule,))
    view = quiet_view()
    (alone,) = link([finding("exploding", 10)], view, Thresholds())
    assert alone.cause is None
    first, second = finding("exploding", 10, layer="a"), finding("exploding", 20, layer="b")
    found = link([second, first], view, Thresholds())
    assert [f.cause for f in found] == [None, cause_of(first)]
    named_itself = finding("dead", 10, layer="a", cause={"kind": "dead", "layer": "a", "step": 10})
    (itself,) = link([named_itself], view, Thresholds())
    assert itself.cause is None, "a cause a check set naming the finding itself is dropped"


def test_causes_set_in_a_loop_do_not_hang_and_keep_every_finding():
    view = quiet_view()
    a = finding("dead", 10, layer="a", cause={"kind": "dead", "layer": "b", "step": 10})
    b = finding("dead", 10, layer="b", cause={"kind": "dead", "layer": "a", "step": 10})
    found = link([a, b], view, Thresholds())
    assert {f.layer: f.cause for f in found} == {"a": a.cause, "b": b.cause}
