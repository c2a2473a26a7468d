"""Progress of a metric: its best value, and how long since it last improved.

The one rule behind the ``plateau`` check and early stopping (:mod:`gradscope.actions.early_stopping`):
a value *improves* on the reference (the value at the last improvement) when it is better
by more than ``max(min_delta, tolerance * |reference|)`` — an absolute margin (early
stopping's ``min_delta``, in the metric's units) or a relative one (``Thresholds.plateau_tolerance``).
The reference moves only when a value improves on it, as in Keras' and Lightning's early
stopping: a metric creeping down by less than the margin per evaluation still counts as
improving once its total gain exceeds the margin, where a comparison with the running best
would call it stalled.

Values are oriented so that lower is better (``sign=+1`` for a metric where higher is
better flips them). Non-finite values never improve (and never become the best).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def improves(oriented: float, reference: float, min_delta: float, tolerance: float) -> bool:
    """The rule: ``oriented`` (lower is better) improves on ``reference`` by more than the margin."""
    return oriented < reference - max(min_delta, tolerance * abs(reference))


@dataclass
class Progress:
    """The running state of one metric, updated one value at a time (O(1) per value).

    Attributes:
        sign: +1 if higher is better, -1 if lower is better (the values as logged).
        min_delta: absolute margin an improvement must beat (metric units, >= 0).
        tolerance: relative margin (fraction of the reference's magnitude, >= 0).
        count: values seen.
        reference: the oriented value at the last improvement (None before the first finite value).
        last_improved: index (0-based, in values seen) of the last improvement, -1 before it.
        best: the best value seen, as logged (None before the first finite value).
        best_index: index of the first value equal to ``best``.
        best_key: the caller's label (e.g. the step) of that value.
        improved_key: the caller's label of the last improvement.
    """

    sign: int = -1
    min_delta: float = 0.0
    tolerance: float = 0.0
    count: int = 0
    reference: float | None = None
    last_improved: int = -1
    best: float | None = None
    best_index: int = -1
    best_key: object = None
    improved_key: object = None

    def update(self, value: float, key: object = None) -> bool:
        """Take the next value (labelled ``key``, e.g. its step); True if it improved."""
        index = self.count
        self.count += 1
        value = float(value)
        if not math.isfinite(value):
            return False
        oriented = -self.sign * value  # lower is better from here on
        if self.best is None or oriented < -self.sign * self.best:
            self.best, self.best_index, self.best_key = value, index, key
        if self.reference is None or improves(oriented, self.reference, self.min_delta, self.tolerance):
            self.reference, self.last_improved, self.improved_key = oriented, index, key
            return True
        return False

    @property
    def waited(self) -> int:
        """Values since the last improvement (all values seen if none improved yet)."""
        return self.count - 1 - self.last_improved


def progress_of(values: np.ndarray, sign: int, min_delta: float = 0.0, tolerance: float = 0.0) -> Progress:
    """:class:`Progress` after the 1-D ``values`` in order (keys are indices): the same result as
    :meth:`Progress.update` on each value, vectorised (the rule is applied to new running
    minima only)."""
    values = np.asarray(values, dtype=np.float64)
    state = Progress(sign=sign, min_delta=min_delta, tolerance=tolerance, count=len(values))
    finite = np.isfinite(values)
    if not finite.any():
        return state
    oriented = np.where(finite, -sign * values, np.inf)
    # An improvement is always a new strict running minimum (the reference is the running
    # minimum at its own index, and later values stay above reference - margin until one
    # improves on it), so only those indices go through the rule.
    before = np.minimum.accumulate(oriented)[:-1]
    candidates = np.concatenate([[int(np.argmax(finite))], np.flatnonzero(oriented[1:] < before) + 1])
    reference, last = None, -1
    for index, value in zip(candidates.tolist(), oriented[candidates].tolist(), strict=True):
        if reference is None or improves(value, reference, min_delta, tolerance):
            reference, last = value, index
    best = int(np.argmin(np.where(finite, oriented, np.inf)))
    state.reference, state.last_improved, state.improved_key = reference, last, last
    state.best, state.best_index, state.best_key = float(values[best]), best, best
    return state
