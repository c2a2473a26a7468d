"""``TimeBudget``: work worth doing often, but never more than a fraction of the run's time.

Two kinds of gradscope's work cost milliseconds and would happily run at every step:
judging the run's health (:mod:`gradscope.actions.cadence`) and writing every layer's
values to a dashboard (:class:`gradscope.outputs.exporters.base.ScalarExporter`: W&B,
for one, spends about 9 µs of this process's CPU per value, so a 400-layer model's nine
values per layer cost more than a 50 ms training step). Both follow one rule, declared
here: a period of such work that has cost ``cost`` seconds so far is followed by at least
``cost / budget`` seconds of wall time, counted from when the period began, before the next
one. On average the work then takes at most ``budget`` of the run's wall time, whatever the
model's size, the machine's speed or the sampling interval; cheap work runs every time.
"""

from __future__ import annotations

import time


def check_budget(owner: str, budget: float | None) -> float | None:
    """``budget`` if it is None or a fraction in (0, 1]; otherwise a ValueError naming ``owner``."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"{owner}: budget must be a fraction of wall time in (0, 1] or None, got {budget!r}")
    return float(budget)


class TimeBudget:
    """The rule above for one kind of work.

    Args:
        budget: the fraction of wall time the work may take, e.g. 0.01.

    Attributes:
        cost: seconds the current period has cost so far.
        last: ``time.perf_counter()`` when the current period began.
    """

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.cost = 0.0
        self.last = time.perf_counter()

    def due(self) -> bool:
        """Whether the wall time since the current period began pays for what it cost."""
        return (time.perf_counter() - self.last) * self.budget >= self.cost

    def begin(self) -> None:
        """A new period of the work begins now."""
        self.last, self.cost = time.perf_counter(), 0.0

    def spend(self, seconds: float) -> None:
        """The work of the current period took ``seconds`` more."""
        self.cost += seconds
