"""When to judge the run: at once when a record carries an alarm, otherwise within a time budget.

Judging (every health check over the history) costs milliseconds (about 10 ms for a
16-layer model with a 1000-step history on the 2-core CPU this was written on), too much
for every step of a fast loop. So the monitor screens each record as it arrives, in
microseconds, for events that must be acted on at once — a NaN/Inf in a gradient, a forward
output or the loss; replicas that disagree; a spike of the total gradient norm or of the loss
— and judges at the step such a record arrives. Findings that build up over many steps
(vanishing, dead layers, plateaus, divergence, sustained explosions) are judged at least
every ``cost / BUDGET`` seconds of wall time, so that judging takes at most ``BUDGET`` of
the training's time (the rule of :mod:`gradscope.outputs.budget`): with the figure above,
every ~1 s.

The spike rules are the exploding check's and the controller's (``Thresholds.spike_factor``
over a running median of ``spike_window`` values, above the run's initial size divided by
the factor), applied to each arriving value; a spike here only makes the monitor judge now
(or, for the loss, gives the learning-rate controller its ``loss_spike`` trigger).
"""

from __future__ import annotations

import collections
import statistics

import numpy as np

from gradscope.health.thresholds import Thresholds
from gradscope.outputs.budget import TimeBudget
from gradscope.run import records
from gradscope.stats import layout

BUDGET = 0.01
"""Fraction of wall time judging may take between alarms."""

LOSS_SPIKE_FACTOR = 3.0
"""A loss above this many times its running median is a spike (losses vary less than gradient norms)."""

_MIN_HISTORY = 5  # values before a running median means anything


class Spikes:
    """A value far above its running median (and above a floor from the run's first values)."""

    def __init__(self, factor: float, window: int) -> None:
        self.factor = factor
        self._recent: collections.deque[float] = collections.deque(maxlen=window)
        self._first: list[float] = []

    def add(self, value: float) -> float | None:
        """Take the next value; returns its running median when it is a spike, else None."""
        if not np.isfinite(value):
            return None
        spike = None
        floor = max(self._first) / self.factor if self._first else 0.0
        # The median is at least the minimum: most values are below factor x minimum, and are
        # no spike without sorting anything (a few microseconds per record).
        if len(self._recent) >= _MIN_HISTORY and value > floor and value > self.factor * min(self._recent):
            median = statistics.median(self._recent)
            if value > self.factor * median and median > 0:
                spike = median
        if spike is None:  # a spike does not raise the median it is judged against
            self._recent.append(value)
        if len(self._first) < _MIN_HISTORY:
            self._first.append(value)
        return spike


class Rise:
    """The loss's trailing mean more than ``rise`` above its best trailing mean, announced at
    most once per ``every`` steps (it is a state, not an event: the check decides)."""

    def __init__(self, rise: float, smooth: int, every: int) -> None:
        self.rise, self.every = rise, every
        self._recent: collections.deque[float] = collections.deque(maxlen=smooth)
        self._best = np.inf
        self._announced = -every

    def add(self, step: int, value: float) -> bool:
        if not np.isfinite(value):
            return False
        self._recent.append(value)
        if len(self._recent) < self._recent.maxlen:
            return False
        mean = sum(self._recent) / len(self._recent)
        self._best = min(self._best, mean)
        if mean > self._best + self.rise * abs(self._best) and step >= self._announced + self.every:
            self._announced = step
            return True
        return False


class Screen:
    """Alarms in arriving records (see the module docstring). ``rise``: also alarm (at most
    once per ``rise_every`` steps) while the loss's trailing mean is that fraction above its
    best (the learning-rate controller's early divergence)."""

    def __init__(self, thresholds: Thresholds, rise: float | None = None, rise_every: int = 1) -> None:
        self.grad_spikes = Spikes(thresholds.spike_factor, thresholds.spike_window)
        self.loss_spikes = Spikes(LOSS_SPIKE_FACTOR, thresholds.spike_window)
        self.rise = Rise(rise, thresholds.smooth, rise_every) if rise is not None else None
        self.alarm = False
        self.loss_spike: tuple[int, float, float] | None = None  # (step, loss, running median) of the newest
        self.episode: int | None = None  # first step of the latest run of steps with NaN/Inf
        self._in_episode = False

    def observe(self, record: records.Record) -> None:
        if isinstance(record, records.Sampled):
            rows = record.rows[record.present]
            if not len(rows):
                return
            if (rows[:, layout.NANS] + rows[:, layout.INFS]).any():
                self._nonfinite(record.step)
            else:
                self._in_episode = False  # finite gradients: a later NaN is a new event
                if self.grad_spikes.add(float(np.sqrt(rows[:, layout.SUMSQ].sum()))) is not None:
                    self.alarm = True
        elif isinstance(record, records.Forward):
            if (record.outputs[:, layout.NANS] + record.outputs[:, layout.INFS]).any():
                self._nonfinite(record.step)
        elif isinstance(record, records.StepValues):
            loss = record.values.get("loss")
            if loss is not None:
                if not np.isfinite(loss):
                    self._nonfinite(record.step)
                else:
                    median = self.loss_spikes.add(float(loss))
                    if median is not None:
                        self.loss_spike = (record.step, float(loss), median)
                        self.alarm = True
                    if self.rise is not None and self.rise.add(record.step, float(loss)):
                        self.alarm = True
        elif isinstance(record, records.Desync):
            self.alarm = True

    def _nonfinite(self, step: int) -> None:
        self.alarm = True
        if not self._in_episode:
            self.episode, self._in_episode = step, True


class Cadence(TimeBudget):
    """Judge on an alarm, or when the time since the last judgement pays for its cost.

    ``cost`` is the latest judgement's duration (judgements vary little) and ``last`` when it
    ended."""

    def __init__(self, budget: float = BUDGET) -> None:
        super().__init__(budget)

    def due(self, alarm: bool) -> bool:
        return alarm or super().due()

    def judged(self, started: float) -> None:
        """A judgement that began at ``started`` (``time.perf_counter()``) just ended."""
        self.begin()
        self.spend(self.last - started)
