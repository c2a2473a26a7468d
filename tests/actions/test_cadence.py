"""When the monitor judges the run (``gradscope.actions.cadence``).

What is tested: the spike rule applied to each arriving value (running median, factor,
the floor from the run's first values, NaN ignored), the rise of the loss announced at
most once per ``every`` steps, the screen's alarms on arriving records (NaN/Inf gradients,
forward outputs and losses, gradient and loss spikes, replicas that disagree, and none on
ordinary records), and the time budget of judgements between alarms.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from gradscope.actions.cadence import BUDGET, LOSS_SPIKE_FACTOR, Cadence, Rise, Screen, Spikes
from gradscope.health.thresholds import Thresholds
from gradscope.run import records
from gradscope.stats import layout

# --------------------------------------------------------------------------------------
# Spikes
# --------------------------------------------------------------------------------------


def feed(spikes: Spikes, values) -> list[float | None]:
    return [spikes.add(v) for v in values]


def test_a_value_far_above_the_running_median_is_a_spike():
    spikes = Spikes(factor=10.0, window=50)
    assert feed(spikes, [1.0, 1.2, 0.8, 1.0, 1.1]) == [None] * 5
    assert spikes.add(10.5) == 1.0  # the running median is returned
    assert spikes.add(9.9) is None  # not above 10x the median: an ordinary value


def test_a_spike_needs_five_values_before_it():
    spikes = Spikes(factor=10.0, window=50)
    assert feed(spikes, [1.0, 1.0, 1.0, 1.0, 100.0]) == [None] * 5
    spikes = Spikes(factor=10.0, window=50)
    assert feed(spikes, [1.0, 1.0, 1.0, 1.0, 1.0, 100.0])[-1] == 1.0


def test_a_spike_does_not_raise_the_median_it_is_judged_against():
    spikes = Spikes(factor=3.0, window=5)
    feed(spikes, [1.0] * 5)
    assert feed(spikes, [4.0, 4.0, 4.0, 4.0]) == [1.0] * 4  # each judged against the quiet median


def test_the_median_is_a_running_one():
    spikes = Spikes(factor=3.0, window=5)
    feed(spikes, [1.0] * 5 + [2.5] * 5)  # the window now holds only 2.5s
    assert spikes.add(4.0) is None  # 4 < 3 x 2.5
    assert spikes.add(8.0) == 2.5


def test_a_spike_must_also_clear_the_floor_of_the_first_values():
    spikes = Spikes(factor=3.0, window=50)
    feed(spikes, [30.0, 1.0, 1.0, 1.0, 1.0])  # the run started at 30: floor 30 / 3 = 10
    assert spikes.add(9.0) is None  # 9x the median, but below the floor
    assert spikes.add(11.0) == 1.0


def test_non_finite_values_are_ignored():
    spikes = Spikes(factor=10.0, window=50)
    assert feed(spikes, [1.0, 1.0, math.nan, 1.0, math.inf, 1.0]) == [None] * 6
    assert spikes.add(100.0) is None  # four finite values so far: not enough for a median
    spikes = Spikes(factor=10.0, window=50)
    feed(spikes, [1.0, math.nan, 1.0, 1.0, 1.0, -math.inf, 1.0])
    assert spikes.add(100.0) == 1.0  # the median is not poisoned by the NaN


def test_a_median_of_zero_has_no_spikes():
    spikes = Spikes(factor=10.0, window=50)
    feed(spikes, [0.0] * 5)
    assert spikes.add(1.0) is None


# --------------------------------------------------------------------------------------
# Rise
# --------------------------------------------------------------------------------------


def test_a_rise_is_announced_at_most_once_per_every_steps():
    rise = Rise(rise=0.2, smooth=3, every=10)
    losses = [1.0, 1.0, 1.0] + [2.0] * 30
    announced = [step for step, loss in enumerate(losses) if rise.add(step, loss)]
    assert announced == [3, 13, 23]  # the trailing mean (1 + 1 + 2) / 3 is 33% above the best at step 3


def test_a_rise_within_the_fraction_or_a_falling_loss_is_not_announced():
    rise = Rise(rise=0.2, smooth=3, every=1)
    assert not any(rise.add(step, loss) for step, loss in enumerate([1.0, 1.0, 1.0, 1.1, 1.15, 1.19, 1.0, 0.5]))
    assert rise.add(8, 2.0)  # (1.0 + 0.5 + 2.0) / 3 = 1.17 is 30% above the best mean (0.9, at step 7)...
    assert not Rise(rise=0.2, smooth=3, every=1).add(0, 100.0)  # ...and a lone value is no mean yet


def test_a_rise_ignores_non_finite_losses():
    rise = Rise(rise=0.2, smooth=3, every=1)
    assert not any(rise.add(step, loss) for step, loss in enumerate([1.0, math.nan, 1.0, math.inf, 1.0]))
    assert rise.add(5, 2.0)  # the mean of the last three finite losses (1, 1, 2) rose by a third


# --------------------------------------------------------------------------------------
# The screen
# --------------------------------------------------------------------------------------


def sampled(step, norms=(1.0, 1.0), nans=(0, 0), infs=(0, 0), present=None) -> records.Sampled:
    rows = np.zeros((len(norms), layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = 10
    rows[:, layout.SUMSQ] = np.square(norms)
    rows[:, layout.NANS] = nans
    rows[:, layout.INFS] = infs
    present = np.ones(len(norms), bool) if present is None else np.asarray(present)
    return records.Sampled(step, rows, present, np.arange(len(norms)))


def forward(step, nans=0) -> records.Forward:
    outputs, inputs = np.zeros((2, layout.ROW_WIDTH)), np.zeros((2, layout.ROW_WIDTH))
    outputs[:, layout.NUMEL] = 10
    outputs[1, layout.NANS] = nans
    return records.Forward(step, outputs, inputs, np.zeros((2, 2), np.int64), ("float32", "float32"))


def screen(**options) -> Screen:
    return Screen(Thresholds(), **options)


def test_nan_or_inf_gradients_alarm():
    s = screen()
    s.observe(sampled(0))
    assert not s.alarm
    s.observe(sampled(1, nans=(0, 3)))
    assert s.alarm
    s = screen()
    s.observe(sampled(1, infs=(1, 0)))
    assert s.alarm


def test_nan_in_a_row_that_is_absent_does_not_alarm():
    s = screen()
    s.observe(sampled(1, nans=(0, 3), present=(True, False)))
    assert not s.alarm


def test_a_spike_of_the_total_gradient_norm_alarms():
    s = screen()
    for step in range(6):
        s.observe(sampled(step, norms=(3.0, 4.0)))  # total norm 5
    assert not s.alarm
    s.observe(sampled(6, norms=(30.0, 40.0)))  # 50: 10x the median, not above it
    assert not s.alarm
    s.observe(sampled(7, norms=(40.0, 40.0)))  # 56.6
    assert s.alarm
    assert s.loss_spike is None  # a gradient spike is not a loss spike


def test_a_nan_in_the_forward_pass_alarms():
    s = screen()
    s.observe(forward(0))
    assert not s.alarm
    s.observe(forward(1, nans=2))
    assert s.alarm


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_alarms(loss):
    s = screen()
    s.observe(records.StepValues(0, {"loss": 1.0, "step_time": 0.01}))
    assert not s.alarm
    s.observe(records.StepValues(1, {"loss": loss}))
    assert s.alarm
    assert s.loss_spike is None


def test_a_loss_spike_alarms_and_is_kept_with_its_median():
    s = screen()
    for step, loss in enumerate([2.0, 2.2, 1.8, 2.0, 2.1, 1.9]):
        s.observe(records.StepValues(step, {"loss": loss}))
    assert not s.alarm
    s.observe(records.StepValues(6, {"loss": 5.9}))  # below 3x the median (2.0)
    assert not s.alarm and LOSS_SPIKE_FACTOR == 3.0
    s.observe(records.StepValues(7, {"loss": 6.5}))
    assert s.alarm
    assert s.loss_spike == (7, 6.5, 2.0)


def test_steps_without_a_loss_and_other_records_do_not_alarm():
    s = screen(rise=0.2, rise_every=25)
    s.observe(records.StepValues(0, {"step_time": 0.5}))
    s.observe(records.Metrics(0, {"val_loss": math.nan}))  # early stopping's business, not an alarm
    s.observe(records.Updates(0, np.ones(2), np.full(2, 1e6)))
    assert not s.alarm


def test_replicas_that_disagree_alarm():
    s = screen()
    s.observe(records.Desync(4, (0,), (1,)))
    assert s.alarm


def test_a_rising_loss_alarms_only_when_the_controller_watches_for_divergence():
    losses = [1.0] * 9 + [1.5] * 9  # a rise of 50%, never a spike (3x)
    watching, blind = screen(rise=0.2, rise_every=25), screen()
    alarms = []
    for step, loss in enumerate(losses):
        watching.observe(records.StepValues(step, {"loss": loss}))
        blind.observe(records.StepValues(step, {"loss": loss}))
        alarms.append(watching.alarm)
        watching.alarm = False  # what a judgement does
    assert alarms.index(True) == 12  # the 9-step mean: (6 x 1.0 + 3 x 1.5) / 9 = 1.17 at step 11, 1.22 at 12
    assert alarms.count(True) == 1  # once per rise_every steps
    assert not blind.alarm


# --------------------------------------------------------------------------------------
# The time budget
# --------------------------------------------------------------------------------------


def test_an_alarm_is_always_due():
    cadence = Cadence()
    cadence.cost, cadence.last = 10.0, time.perf_counter()
    assert cadence.due(True)


def test_the_first_judgement_is_due_at_once():
    assert Cadence().due(False)  # nothing measured yet: no cost to pay for


def test_between_alarms_judging_takes_at_most_its_budget():
    cadence = Cadence(budget=0.5)
    cadence.cost = 1.0  # a judgement takes a second: one per two seconds
    cadence.last = time.perf_counter() - 1.0
    assert not cadence.due(False)
    cadence.last = time.perf_counter() - 2.5
    assert cadence.due(False)
    assert Cadence().budget == BUDGET == 0.01


def test_a_judgement_records_its_cost_and_end():
    cadence = Cadence()
    started = time.perf_counter() - 0.25
    cadence.judged(started)
    assert 0.25 <= cadence.cost < 5.0
    assert time.perf_counter() - cadence.last < 5.0
    assert not cadence.due(False)  # 0.25 s of judging buys 25 s without another
