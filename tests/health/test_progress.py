"""``gradscope.health.progress``: the "has this metric improved?" rule shared by the ``plateau``
check and early stopping.

``Progress`` (one value at a time) is checked against a plain-Python reference of the rule
(a value improves when it beats the value at the *last improvement* by more than
``max(min_delta, tolerance * |reference|)``; non-finite values never improve nor become the
best), ``progress_of`` (vectorised) against ``Progress`` on hypothesis-generated sequences with
NaN/Inf mixed in, both signs, absolute and relative margins; and the ``plateau`` check, run by
a real monitor, on a slowly creeping loss (not a plateau: its total gain is large) and on a
flat noisy one (a plateau).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradscope
from gradscope.health.progress import Progress, improves, progress_of

# --------------------------------------------------------------------------------------
# A plain reference of the rule
# --------------------------------------------------------------------------------------


def reference_progress(values, sign, min_delta=0.0, tolerance=0.0):
    """Walk the values: the reference is the (lower-is-better) value at the last improvement;
    the best is the first occurrence of the best finite value. Returns a dict of the state."""
    reference, last_improved, best, best_index = None, -1, None, -1
    for index, value in enumerate(values):
        if not math.isfinite(value):
            continue
        oriented = value if sign < 0 else -value
        if best is None or (value < best if sign < 0 else value > best):
            best, best_index = value, index
        margin = max(min_delta, tolerance * abs(reference)) if reference is not None else 0.0
        if reference is None or oriented < reference - margin:
            reference, last_improved = oriented, index
    return {
        "count": len(values),
        "reference": reference,
        "last_improved": last_improved,
        "best": best,
        "best_index": best_index,
    }


def state_of(progress: Progress) -> dict:
    return {
        "count": progress.count,
        "reference": progress.reference,
        "last_improved": progress.last_improved,
        "best": progress.best,
        "best_index": progress.best_index,
    }


def incremental(values, sign, min_delta=0.0, tolerance=0.0) -> tuple[Progress, list[bool]]:
    progress = Progress(sign=sign, min_delta=min_delta, tolerance=tolerance)
    improved = [progress.update(value, key=index) for index, value in enumerate(values)]
    return progress, improved


# Values on a coarse grid make ties, equal references and "exactly at the margin" common.
metric_values = st.lists(
    st.one_of(
        st.integers(-40, 40).map(lambda k: k / 8),
        st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
        st.sampled_from([math.nan, math.inf, -math.inf]),
    ),
    max_size=60,
)
margins = st.one_of(st.just(0.0), st.sampled_from([0.125, 0.5, 1.0]), st.floats(0.0, 5.0))
tolerances = st.one_of(st.just(0.0), st.sampled_from([1e-3, 0.1, 0.5]), st.floats(0.0, 2.0))


# --------------------------------------------------------------------------------------
# Progress: the incremental rule
# --------------------------------------------------------------------------------------


def test_a_value_improves_only_by_more_than_the_margin():
    assert improves(0.9, 1.0, min_delta=0.05, tolerance=0.0)
    assert not improves(0.95, 1.0, min_delta=0.05, tolerance=0.0)  # exactly the margin is not enough
    assert not improves(0.96, 1.0, min_delta=0.05, tolerance=0.0)
    assert improves(-1.2, -1.0, min_delta=0.0, tolerance=0.1)  # relative to |reference|
    assert not improves(-1.05, -1.0, min_delta=0.0, tolerance=0.1)
    assert not improves(0.999, 1.0, min_delta=0.0, tolerance=1e-3)
    assert improves(0.998, 1.0, min_delta=0.0, tolerance=1e-3)


def test_progress_counts_evaluations_since_the_last_improvement():
    progress = Progress(sign=-1)
    assert [progress.update(v, key=10 * i) for i, v in enumerate([3.0, 2.0, 2.5, 2.0, 1.0, 1.5])] == [
        True,
        True,
        False,
        False,  # equal to the reference: no improvement
        True,
        False,
    ]
    assert progress.waited == 1
    assert (progress.best, progress.best_key, progress.improved_key) == (1.0, 40, 40)


def test_a_slow_creep_improves_once_its_total_gain_beats_the_margin():
    """The reference stays at the last improvement: 0.04 per evaluation with min_delta 0.1 is
    an improvement every third evaluation, where comparing with the running best would wait forever."""
    progress = Progress(sign=-1, min_delta=0.1)
    improved = [progress.update(1.0 - 0.04 * i) for i in range(10)]
    assert improved == [True, False, False, True, False, False, True, False, False, True]
    assert progress.waited == 0
    assert progress.best == pytest.approx(1.0 - 0.04 * 9)


def test_higher_is_better_and_the_first_best_is_kept():
    progress = Progress(sign=1)
    for key, value in enumerate([0.5, 0.7, 0.7, 0.6]):
        progress.update(value, key=key)
    assert (progress.best, progress.best_key, progress.best_index) == (0.7, 1, 1)
    assert progress.reference == -0.7 and progress.last_improved == 1 and progress.waited == 2


def test_non_finite_values_never_improve_nor_become_the_best():
    progress = Progress(sign=-1)
    assert [progress.update(v) for v in [math.nan, -math.inf, 2.0, math.inf, -math.inf, math.nan]] == [
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    assert progress.best == 2.0 and progress.best_index == 2 and progress.waited == 3


@given(metric_values, st.sampled_from([-1, 1]), margins, tolerances)
def test_progress_follows_the_reference_rule(values, sign, min_delta, tolerance):
    progress, improved = incremental(values, sign, min_delta, tolerance)
    expected = reference_progress(values, sign, min_delta, tolerance)
    assert state_of(progress) == expected
    assert progress.waited == len(values) - 1 - expected["last_improved"]
    assert progress.best_key == (expected["best_index"] if expected["best_index"] >= 0 else None)
    if expected["last_improved"] >= 0:
        assert improved[expected["last_improved"]] and not any(improved[expected["last_improved"] + 1 :])


# --------------------------------------------------------------------------------------
# progress_of: the vectorised rule equals Progress.update on each value
# --------------------------------------------------------------------------------------


@given(metric_values, st.sampled_from([-1, 1]), margins, tolerances)
def test_progress_of_equals_progress_update_on_each_value(values, sign, min_delta, tolerance):
    progress, _ = incremental(values, sign, min_delta, tolerance)
    vectorised = progress_of(np.array(values, dtype=np.float64), sign, min_delta=min_delta, tolerance=tolerance)
    assert vectorised.count == progress.count == len(values)
    assert vectorised.last_improved == progress.last_improved
    assert vectorised.reference == progress.reference
    assert vectorised.best == progress.best
    assert vectorised.best_index == progress.best_index
    assert vectorised.best_key == progress.best_key  # keys are indices in both
    assert vectorised.improved_key == progress.improved_key
    assert vectorised.waited == progress.waited


@given(
    st.lists(st.floats(0.5, 2.0), min_size=1, max_size=40),
    st.integers(0, 20),
    st.sampled_from([-1, 1]),
    tolerances,
)
def test_progress_of_ignores_leading_non_finite_values(values, lead, sign, tolerance):
    padded = [math.nan, math.inf, -math.inf] * (lead // 3) + [math.nan] * (lead % 3) + values
    state = progress_of(np.array(padded), sign, tolerance=tolerance)
    plain = progress_of(np.array(values), sign, tolerance=tolerance)
    assert state.count == len(padded)
    assert state.last_improved == plain.last_improved + lead
    assert state.best_index == plain.best_index + lead
    assert (state.reference, state.best) == (plain.reference, plain.best)


def test_progress_of_with_no_finite_value_has_no_best():
    for values in ([], [math.nan], [math.inf, -math.inf, math.nan]):
        state = progress_of(np.array(values, dtype=np.float64), -1)
        assert state.count == len(values)
        assert (state.best, state.reference, state.last_improved) == (None, None, -1)
        assert state.waited == len(values)


# --------------------------------------------------------------------------------------
# The plateau check, through a real monitor
# --------------------------------------------------------------------------------------


def plateaus(losses, thresholds=None):
    """The plateau findings of a monitor fed one loss per step (no backward: loss only)."""
    options = {"thresholds": thresholds} if thresholds is not None else {}
    with gradscope.watch(torch.nn.Linear(2, 1), **options) as mon:
        for value in losses:
            mon.step(loss=float(value))
        return [f for f in mon.report().findings if f.kind == "plateau"]


def test_a_loss_creeping_down_below_the_tolerance_each_step_is_not_a_plateau():
    """0.05% per step is under plateau_tolerance (0.1%) at every step, but it is 18% in 400
    steps: against the value at the last improvement it improves every other step."""
    t = gradscope.Thresholds()
    losses = 2.0 * 0.9995 ** np.arange(400)
    steps_gain = 1 - losses[1:] / losses[:-1]
    assert (steps_gain < t.plateau_tolerance).all() and losses[-1] < 0.85 * losses[0]
    assert len(losses) > t.plateau_patience + 100  # long enough for a plateau to be judged
    assert plateaus(losses) == []


def test_a_flat_noisy_loss_is_a_plateau():
    t = gradscope.Thresholds()
    rng = np.random.default_rng(0)
    losses = 1.5 + 1e-4 * rng.standard_normal(400)  # smoothed noise ~3e-5: far below 0.1% of 1.5
    (plateau,) = plateaus(losses)
    assert plateau.evidence["metric"] == "loss"
    assert plateau.evidence["waited"] >= t.plateau_patience
    assert plateau.step == 399
    # The step it last improved: what progress_of says of the smoothed loss the check judges.
    smoothed = np.array([losses[max(0, i - t.smooth + 1) : i + 1].mean() for i in range(len(losses))])
    last = progress_of(smoothed, -1, tolerance=t.plateau_tolerance).last_improved
    assert plateau.since_step == last and plateau.evidence["waited"] == 399 - last


def test_the_same_creep_is_a_plateau_with_a_tolerance_larger_than_its_total_gain():
    """The creep is judged by its gain, not by its direction: with a 25% tolerance the 18% it
    gains in 400 steps is no progress (a check that can fail both ways)."""
    losses = 2.0 * 0.9995 ** np.arange(400)
    (plateau,) = plateaus(losses, gradscope.Thresholds(plateau_tolerance=0.25))
    assert plateau.since_step == 0 and plateau.evidence["waited"] == 399
