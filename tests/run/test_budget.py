"""The history's memory budget (``gradscope.run.budget``): the bytes a ``History`` allocates,
the sizes a budget gives it (exact integers, checked against what they must satisfy rather than
the same formula), the thinning that keeps its span, and the warning's numbers."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from run_builders import run_info

from gradscope.run.budget import (
    HISTORY_MIB,
    MIN_DENSE,
    history_bytes,
    plan_history,
    plan_of,
    step_capacity,
)

MIB = 2**20


# ---- bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("track_updates", [False, True])
@pytest.mark.parametrize("hist_dtype", [np.uint32, np.int64])
def test_history_bytes_are_what_the_history_allocates(track_updates, hist_dtype):
    plan = plan_history(5, 3, 40, 7, track_updates=track_updates, hist_dtype=hist_dtype, history_mib=1)
    history = plan.build(tuple("abcde"))
    assert history.nbytes == plan.nbytes == history_bytes(5, 40, 7, 120, track_updates, hist_dtype)
    # The numbers the README and the History docstring give: per row 61 (77) and 265 (521), 49 per step.
    per_sampled, per_hist = (77 if track_updates else 61), (521 if hist_dtype is np.int64 else 265)
    assert plan.nbytes == 40 * (8 + 5 * per_sampled) + 7 * (8 + 5 * per_hist) + 120 * 49


def test_logged_metrics_add_eight_bytes_per_step_slot():
    history = plan_history(2, 1, 10, 10).build(("a", "b"))
    before = history.nbytes
    history.add_metrics(0, {"lr": 0.1, "val_loss": 2.0})
    assert history.nbytes == before + 2 * 8 * 10


def test_step_capacity_spans_the_sampled_steps_up_to_2_to_the_20():
    assert step_capacity(10_000, 1) == 10_000
    assert step_capacity(10_000, 4) == 40_000
    assert step_capacity(10_000, 1000) == 1 << 20
    assert step_capacity(2_000_000, 1) == 2_000_000  # never fewer than the sampled steps


# ---- the sizes a budget gives -----------------------------------------------------------


def test_a_small_model_keeps_everything_asked_for():
    plan = plan_history(200, 1, 10_000, 1_000)
    assert not plan.shortened
    assert (plan.capacity, plan.dense, plan.stride, plan.hist_capacity) == (10_000, 10_000, 1, 1_000)
    assert plan.nbytes == plan.asked_bytes == 175_578_000  # README: 122 MB + 53 MB for 200 layers


def test_ten_thousand_rows_at_the_defaults():
    plan = plan_history(10_000, 1, 10_000, 1_000)
    assert plan.history_mib == HISTORY_MIB == 512
    assert plan.asked_bytes == 8_750_578_000  # the 8.75 GB issue 26 measured
    assert (plan.capacity, plan.dense, plan.stride, plan.hist_capacity) == (614, 311, 32, 61)
    assert plan.nbytes <= 512 * MIB


@given(
    rows=st.integers(1, 3_000_000),
    every=st.integers(1, 50),
    history=st.integers(1, 50_000),
    hist_history=st.integers(1, 5_000),
    history_mib=st.integers(1, 4096),
    track_updates=st.booleans(),
    wide=st.booleans(),
)
@example(rows=10_000, every=1, history=10_000, hist_history=1_000, history_mib=512, track_updates=False, wide=False)
@example(rows=723, every=1, history=10_000, hist_history=1_000, history_mib=512, track_updates=True, wide=False)
@example(rows=50, every=3, history=10_000, hist_history=100, history_mib=1, track_updates=False, wide=True)
@example(rows=2_000_000, every=1, history=10_000, hist_history=1_000, history_mib=512, track_updates=False, wide=False)
def test_plan_satisfies_its_rules(rows, every, history, hist_history, history_mib, track_updates, wide):
    hist_dtype = np.int64 if wide else np.uint32
    plan = plan_history(
        rows, every, history, hist_history, track_updates=track_updates, hist_dtype=hist_dtype, history_mib=history_mib
    )
    budget = history_mib * MIB
    sizes = (plan.capacity, plan.dense, plan.stride, plan.hist_capacity, plan.step_capacity, plan.nbytes)
    assert all(type(x) is int for x in sizes)  # exact integers: no float64 rounding at any size
    hist_history = min(hist_history, history)
    sampled_slot = 8 + rows * (77 if track_updates else 61)
    hist_slot = 8 + rows * (521 if wide else 265)
    steps = plan.step_capacity * 49
    asked = history * sampled_slot + hist_history * hist_slot + steps
    assert plan.asked_bytes == asked
    assert plan.nbytes == plan.capacity * sampled_slot + plan.hist_capacity * hist_slot + steps
    if asked <= budget:
        assert (plan.capacity, plan.hist_capacity, plan.dense, plan.stride) == (history, hist_history, history, 1)
        assert not plan.shortened and not plan.warns
        return
    assert plan.shortened or (plan.capacity == history == 1 and plan.hist_capacity == hist_history == 1)
    assert plan.warns
    # Within the budget, unless even one slot of each does not fit.
    assert plan.nbytes <= budget or plan.capacity == plan.hist_capacity == 1
    # The histogram ring is shortened by the factor room / rings, floored (at least 1) ...
    room, rings = max(budget - steps, 0), asked - steps
    assert plan.hist_capacity == max(int(Fraction(hist_history * room, rings)), 1)
    # ... and the sampled ring takes the rest: one slot more would not fit.
    assert 1 <= plan.capacity <= history
    assert plan.capacity == 1 or plan.capacity * sampled_slot + plan.hist_capacity * hist_slot <= room
    assert plan.capacity == history or (plan.capacity + 1) * sampled_slot + plan.hist_capacity * hist_slot > room
    if hist_history * room >= rings:  # the histogram ring took no more than its share: nor less than its own
        assert plan.capacity >= int(Fraction(history * room, rings))
    # The newest steps stay dense: at least half the slots and at least MIN_DENSE of them.
    assert 1 <= plan.dense <= plan.capacity
    assert plan.dense >= min(plan.capacity, MIN_DENSE) and plan.dense * 2 >= plan.capacity
    most = max(min(plan.capacity // 2, plan.capacity - MIN_DENSE), 0)  # thinned slots allowed
    if not most:
        assert (plan.dense, plan.stride) == (plan.capacity, 1)
        return
    thinned = plan.capacity - plan.dense
    assert 1 <= thinned <= most and plan.stride >= 2
    # It reaches back `history` sampled steps ...
    assert plan.dense + thinned * plan.stride >= history
    # ... with the smallest stride that can (given at most `most` thinned slots) ...
    assert (plan.capacity - most) + most * (plan.stride - 1) < history
    # ... and the most dense slots that stride allows.
    assert (plan.dense + 1) + (thinned - 1) * plan.stride < history


def test_plan_of_a_run_reads_its_info_and_may_override_the_budget():
    info = run_info([f"l{i}" for i in range(1000)], numel=10, history=10_000, hist_history=1_000)
    assert plan_of(info) == plan_history(1000, 1, 10_000, 1_000, history_mib=512)
    assert plan_of(info, history_mib=2048) == plan_history(1000, 1, 10_000, 1_000, history_mib=2048)
    assert not plan_of(info, history_mib=2048).shortened
    huge = run_info(["a", "b"], numel=[2**32, 1], history=5, hist_history=5)
    assert plan_of(huge).hist_dtype == "int64" and plan_of(info).hist_dtype == "uint32"


def test_a_plan_builds_a_history_for_its_row_count_only():
    with pytest.raises(ValueError, match="for 2 rows given 3 names"):
        plan_history(2, 1, 10, 10).build(("a", "b", "c"))


# ---- the warning's words ----------------------------------------------------------------


def test_the_warning_names_the_numbers_and_how_to_keep_everything():
    message = plan_history(10_000, 1, 10_000, 1_000).warning("watch")
    for part in (
        "history_mib=512 keeps 614 sampled-step slots for the history=10000 sampled steps asked for",
        "10000 rows take 610008 bytes per sampled step and 2650008 per step with histograms",
        "8750578000 bytes in all (8346 MiB)",
        "the newest 311 sampled steps, then one in 32 back to 10007 sampled steps",
        "the histograms of the newest 61 of 1000 steps that have them",
        "watch(..., history_mib=8346) or more",
    ):
        assert part in message
    assert "load_run(..., history_mib=8346)" in plan_history(10_000, 1, 10_000, 1_000).warning("load_run")
    assert "more than" not in message


def test_a_history_that_cannot_shrink_to_the_budget_says_so():
    plan = plan_history(2_000_000, 1, 10_000, 1_000)  # one slot of each: 652 MB
    assert (plan.capacity, plan.hist_capacity) == (1, 1) and plan.nbytes > 512 * MIB and plan.warns
    assert "more than history_mib=512 allows: a history keeps at least one sampled step" in plan.warning()
    tiny = plan_history(4_000, 1, 1, 1, history_mib=1)  # nothing to shorten, yet over the budget
    assert not tiny.shortened and tiny.warns
