"""Early stopping: ``gradscope.EarlyStopping`` and ``mon.should_stop``, ``mon.stop_reason``,
``mon.best_step``, ``mon.best_value``.

The settings are validated (patience, min_delta, direction, a metric whose direction cannot
be inferred). The stopper is compared with an independent plain-loop reference of the
Keras/Lightning rule (a value improves when it beats the value at the *last improvement* by
more than ``min_delta``; stop after ``patience`` evaluations in a row without improvement,
or at a NaN/Inf; the best is the first occurrence of the best value) on hypothesis-generated
sequences, fed as records and through ``mon.log`` of a real monitor. A real MLP that
memorises 32 noisy training examples, evaluated every 10 steps on held-out data, is stopped
at the evaluation the reference names and reports the best step, on ``val_loss`` and on
``val_accuracy`` (higher is better). A first evaluation without the watched metric warns once.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiers import examples
from torch import nn
from torch.nn import functional as F

import gradscope
from gradscope.actions.early_stopping import EarlyStopper
from gradscope.run import records

# --------------------------------------------------------------------------------------
# The reference: a plain loop of the Keras/Lightning rule
# --------------------------------------------------------------------------------------


def reference_early_stopping(values, patience, min_delta=0.0, higher_is_better=False):
    """After each value: (should_stop, best_index). ``should_stop`` turns True at the first
    NaN/Inf or once ``patience`` values in a row did not beat the value at the last
    improvement by more than ``min_delta``, and stays True; the best is the first occurrence
    of the best finite value."""
    out = []
    last_improvement = best = best_index = None
    wait, stopped = 0, False
    for index, value in enumerate(values):
        if math.isfinite(value):
            better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
            if best is None or better(value, best):
                best, best_index = value, index
            target = None
            if last_improvement is not None:
                target = last_improvement + min_delta if higher_is_better else last_improvement - min_delta
            if last_improvement is None or better(value, target):
                last_improvement, wait = value, 0
            else:
                wait += 1
            if wait >= patience:
                stopped = True
        else:
            stopped = True
        out.append((stopped, best_index))
    return out


def stop_index(reference):
    """The index of the evaluation at which the reference stops (None if it does not)."""
    return next((i for i, (stopped, _) in enumerate(reference) if stopped), None)


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("patience", [0, -3, 1.5, True, "5", None])
def test_patience_must_be_a_positive_integer(patience):
    with pytest.raises(ValueError, match="patience"):
        gradscope.EarlyStopping(patience=patience)


@pytest.mark.parametrize("min_delta", [-0.01, math.nan, math.inf, True, "0.1"])
def test_min_delta_must_be_a_finite_number_at_least_zero(min_delta):
    with pytest.raises(ValueError, match="min_delta"):
        gradscope.EarlyStopping(min_delta=min_delta)


@pytest.mark.parametrize("direction", ["up", "minimize", "MIN", 1])
def test_direction_must_be_min_max_or_none(direction):
    with pytest.raises(ValueError, match="direction"):
        gradscope.EarlyStopping(direction=direction)


def test_a_metric_of_unknown_direction_needs_one():
    with pytest.raises(ValueError, match="'foo'"):
        gradscope.EarlyStopping(metric="foo")
    assert gradscope.EarlyStopping(metric="foo", direction="max").sign == 1
    assert gradscope.EarlyStopping(metric="val_accuracy").sign == 1
    assert gradscope.EarlyStopping(metric="val_loss").sign == -1
    assert gradscope.EarlyStopping(metric="val_accuracy", direction="min").sign == -1  # the caller knows best


def test_early_stopping_true_means_val_loss_with_patience_5():
    with gradscope.watch(nn.Linear(2, 1), early_stopping=True) as mon:
        assert mon.options.early_stopping == gradscope.EarlyStopping("val_loss", 5, 0.0, None)
        for value in [1.0, 0.9, 1.0, 1.0, 1.0, 1.0]:
            mon.step()
            mon.log(val_loss=value)
        assert not mon.should_stop
        mon.step()
        mon.log(val_loss=0.95)
        assert mon.should_stop and mon.best_step == 1 and mon.best_value == 0.9


def test_early_stopping_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="early_stopping"):
        gradscope.watch(nn.Linear(2, 1), early_stopping="val_loss")


def test_without_early_stopping_nothing_stops():
    with gradscope.watch(nn.Linear(2, 1), early_stopping=False) as mon:
        for value in [1.0, math.nan, 2.0]:
            mon.step()
            mon.log(val_loss=value)
        assert mon.should_stop is False
        assert (mon.stop_reason, mon.best_step, mon.best_value) == (None, None, None)


# --------------------------------------------------------------------------------------
# The rule, against the reference
# --------------------------------------------------------------------------------------

evaluations = st.lists(
    st.one_of(
        st.integers(0, 24).map(lambda k: k / 8),  # ties and exact margins
        st.floats(-10.0, 10.0, allow_nan=False),
        st.sampled_from([math.nan, math.inf, -math.inf]),
    ),
    min_size=1,
    max_size=40,
).filter(lambda values: sum(not math.isfinite(v) for v in values) <= 2)


@given(
    evaluations,
    st.integers(1, 6),
    st.sampled_from([0.0, 0.125, 0.25, 0.3]),
    st.sampled_from(["min", "max"]),
    st.integers(1, 7),
)
def test_the_stopper_follows_the_reference_rule(values, patience, min_delta, direction, spacing):
    config = gradscope.EarlyStopping("val_loss", patience, min_delta, direction)
    stopper = EarlyStopper(config)
    reference = reference_early_stopping(values, patience, min_delta, higher_is_better=direction == "max")
    stops = []
    for index, value in enumerate(values):
        step = spacing * (index + 1) - 1
        action, warning = stopper.observe(records.Metrics(step, {"val_loss": value, "val_other": 1.0}))
        assert warning is None
        if action is not None:
            stops.append(index)
            assert action.action == "stop" and action.step == step
            assert action.detail["best_step"] == stopper.best_step
        should_stop, best_index = reference[index]
        assert stopper.should_stop == should_stop, (index, values[: index + 1])
        assert stopper.best_step == (None if best_index is None else spacing * (best_index + 1) - 1)
        assert stopper.best_value == (None if best_index is None else values[best_index])
    expected = stop_index(reference)
    assert stops == ([] if expected is None else [expected])  # one stop action, when it stops
    assert (stopper.reason is None) == (expected is None)


def test_records_without_the_metric_are_not_evaluations():
    stopper = EarlyStopper(gradscope.EarlyStopping(patience=1))
    assert stopper.observe(records.Metrics(0, {"val_loss": 1.0})) == (None, None)
    for step in range(1, 6):
        assert stopper.observe(records.Metrics(step, {"val_accuracy": 0.5})) == (None, None)
        assert stopper.observe(records.StepValues(step, {"loss": 0.1})) == (None, None)
    assert not stopper.should_stop
    action, _ = stopper.observe(records.StepValues(7, {"loss": 0.1, "val_loss": 1.0}))
    assert stopper.should_stop and action is not None and action.step == 7


def test_a_creeping_metric_keeps_improving_against_the_last_improvement():
    """0.004 better per evaluation with min_delta 0.01: each evaluation is within min_delta of
    the one before, but every third beats the last improvement by more than min_delta, so
    patience 3 never runs out (compared with the running best, every value would be stale)."""
    with gradscope.watch(nn.Linear(2, 1), early_stopping=gradscope.EarlyStopping(patience=3, min_delta=0.01)) as mon:
        for k in range(60):
            mon.step()
            mon.log(val_loss=1.0 - 0.004 * k)
            assert not mon.should_stop, k
        assert mon.best_step == 59 and mon.best_value == pytest.approx(1.0 - 0.004 * 59)
        # The last improvement was at k=57 (k=58 and 59 are within min_delta of it): one more
        # value that does not beat it by more than min_delta is the third in a row.
        mon.step()
        mon.log(val_loss=0.77)
        assert mon.should_stop
        assert mon.stop_reason == (
            f"val_loss has not improved by more than 0.01 for 3 evaluations; best {1.0 - 0.004 * 59:.6g} at step 59"
        )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metric_stops_at_once(bad):
    with gradscope.watch(nn.Linear(2, 1), early_stopping=gradscope.EarlyStopping(patience=100)) as mon:
        for value in [1.0, 0.5, 0.6, bad, 0.1]:
            mon.step()
            mon.log(val_loss=value)
            if value == 0.6:
                assert not mon.should_stop
        assert mon.should_stop
        assert mon.stop_reason == f"val_loss is {bad} at step 3"
        assert mon.best_step == 4 and mon.best_value == 0.1  # the best keeps being tracked
        (action,) = mon.report().actions
        assert action["action"] == "stop" and action["step"] == 3


@settings(max_examples=examples(15))
@given(evaluations, st.integers(1, 4), st.sampled_from([0.0, 0.25]))
def test_a_monitor_fed_by_mon_log_follows_the_reference_rule(values, patience, min_delta):
    """The same rule through a real monitor, with training steps between evaluations."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reference = reference_early_stopping(values, patience, min_delta)
    x = torch.randn(8, 3)
    stopping = gradscope.EarlyStopping(patience=patience, min_delta=min_delta)
    with gradscope.watch(model, optimizer=opt, early_stopping=stopping) as mon:
        for index, value in enumerate(values):
            for _ in range(2):
                model(x).pow(2).mean().backward()
                mon.step()
                opt.step()
                opt.zero_grad()
            mon.log(val_loss=value, val_accuracy=0.5)
            should_stop, best_index = reference[index]
            assert mon.should_stop == should_stop
            assert mon.best_step == (None if best_index is None else 2 * best_index + 1)
        expected = stop_index(reference)
        stops = [a for a in mon.report().actions if a["action"] == "stop"]
        assert [a["step"] for a in stops] == ([] if expected is None else [2 * expected + 1])


# --------------------------------------------------------------------------------------
# The missing-metric warning
# --------------------------------------------------------------------------------------


def test_a_first_evaluation_without_the_metric_warns_once_naming_it_and_what_was_logged():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(nn.Linear(2, 1), early_stopping=True) as mon:
            for _ in range(5):
                mon.step(loss=1.0)
                mon.log(valid_loss=0.5, val_acc=0.9)
    about = [w for w in caught if issubclass(w.category, RuntimeWarning) and "early stopping" in str(w.message)]
    assert len(about) == 1
    message = str(about[0].message)
    assert "'val_loss'" in message and "val_acc, valid_loss" in message and "step 0" in message
    assert not mon.should_stop and mon.best_step is None
    assert len([e for e in mon.errors if "'val_loss'" in e]) == 1


def test_no_warning_when_the_first_evaluation_has_the_metric():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(nn.Linear(2, 1), early_stopping=True) as mon:
            mon.step(loss=1.0)
            mon.log(val_loss=0.5)
            for _ in range(3):
                mon.step(loss=1.0)
                mon.log(train_accuracy=0.8)  # other metrics, logged on their own
    assert not [w for w in caught if "early stopping" in str(w.message)]
    assert mon.errors == [] and mon.best_step == 0


# --------------------------------------------------------------------------------------
# A real run that overfits
# --------------------------------------------------------------------------------------

EVAL_EVERY = 10


def noisy_task(seed=0, classes=4, inputs=16):
    """32 training examples whose labels are 40% random, and 512 clean held-out examples."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(inputs, classes, generator=g)

    def examples(n, noise):
        x = torch.randn(n, inputs, generator=g)
        y = (x @ teacher).argmax(dim=1)
        flip = torch.rand(n, generator=g) < noise
        return x, torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)

    return examples(32, 0.4), examples(512, 0.0)


def train_until_stopped(stopping, steps=400):
    """A 16-256-256-4 MLP (70k parameters) trained on the 32 examples, full batch, evaluated
    every 10 steps: it memorises the noisy labels and the held-out loss turns up. The loop
    stops when ``mon.should_stop``. Returns the monitor, the logged (step, val_loss,
    val_accuracy) and ``should_stop`` after each evaluation."""
    (x, y), (x_val, y_val) = noisy_task()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    logged, stopped = [], []
    with gradscope.watch(model, optimizer=opt, early_stopping=stopping) as mon:
        for step in range(steps):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss=loss.detach())
            opt.step()
            opt.zero_grad()
            if step % EVAL_EVERY == EVAL_EVERY - 1:
                with torch.no_grad():
                    logits = model(x_val)
                    val_loss = float(F.cross_entropy(logits, y_val))
                    val_accuracy = float((logits.argmax(dim=1) == y_val).float().mean())
                mon.log(val_loss=val_loss, val_accuracy=val_accuracy)
                logged.append((step, val_loss, val_accuracy))
                stopped.append(mon.should_stop)
                if mon.should_stop:
                    break
    return mon, logged, stopped


@pytest.mark.parametrize(
    ("stopping", "column", "higher"),
    [
        (gradscope.EarlyStopping(patience=5), 1, False),
        (gradscope.EarlyStopping(patience=3, min_delta=0.02), 1, False),
        (gradscope.EarlyStopping(metric="val_accuracy", patience=5, direction="max"), 2, True),
    ],
    ids=["val_loss", "val_loss-min_delta", "val_accuracy-max"],
)
def test_early_stopping_stops_at_the_right_evaluation_and_reports_the_best_step_on_a_run_that_overfits(
    stopping, column, higher
):
    mon, logged, stopped = train_until_stopped(stopping)
    steps, values = [row[0] for row in logged], [row[column] for row in logged]
    reference = reference_early_stopping(values, stopping.patience, stopping.min_delta, higher_is_better=higher)
    at = stop_index(reference)
    assert at is not None and at < 39, values  # the run did stop before the step budget
    assert stopped == [False] * at + [True]  # at exactly the evaluation the reference names
    best = (max if higher else min)(values)
    assert mon.best_value == best
    assert mon.best_step == steps[values.index(best)] == steps[reference[at][1]]
    assert 0 < values.index(best) < at  # it improved first, then got worse: overfitting
    if not higher:
        assert values[-1] > best  # stopped on a held-out loss that has turned up
    assert mon.stop_reason.startswith(f"{stopping.metric} has not improved")
    assert f"at step {mon.best_step}" in mon.stop_reason
    (action,) = [a for a in mon.report().actions if a["action"] == "stop"]
    assert action["step"] == steps[at]
    assert action["detail"] == {"metric": stopping.metric, "best_step": mon.best_step, "best_value": best}
