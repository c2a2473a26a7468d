"""``TimeBudget``: work that may take at most a fraction of wall time (the clock is set by hand)."""

import time

import pytest

from gradscope.outputs.budget import TimeBudget, check_budget


def test_nothing_spent_is_due_at_once():
    assert TimeBudget(0.01).due()


def test_a_period_is_due_again_once_wall_time_pays_for_its_cost():
    budget = TimeBudget(0.5)
    budget.begin()
    budget.spend(0.25)
    budget.spend(0.75)  # the period cost a second in all: due two seconds after it began
    budget.last = time.perf_counter() - 1.5
    assert not budget.due()
    budget.last = time.perf_counter() - 2.5
    assert budget.due()


def test_a_new_period_starts_from_nothing():
    budget = TimeBudget(0.01)
    budget.spend(100.0)
    assert not budget.due()
    budget.begin()
    assert budget.cost == 0.0 and budget.due()


@pytest.mark.parametrize("value", [0.01, 1, 1.0, None])
def test_good_budgets_pass(value):
    assert check_budget("X", value) == (None if value is None else float(value))


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.01, True, "0.01", float("nan")])
def test_bad_budgets_name_their_owner(value):
    with pytest.raises(ValueError, match=r"MyExporter: budget must be a fraction of wall time in \(0, 1\] or None"):
        check_budget("MyExporter", value)
