"""``RunState``: what is known about a training run, built from records (data, no verdicts).

A live :class:`gradscope.Monitor` feeds it records as measurements reach the host; a run log
(:mod:`gradscope.run.logfile`) holds the same records, and replaying them into a new
``RunState`` rebuilds the same history and the same remembered events, and therefore the
same health report (:mod:`gradscope.health` reads a ``RunState``). The records are:

* ``sampled``: a sampled step's per-row statistics rows, presence and backward order;
* ``forward``: a sampled step's forward statistics per module (``watch(..., forward=True)``);
* ``step``: a step's scalar values (loss, step time, memory, energy, scale, step metrics);
* ``metrics``: metrics logged with ``mon.log``;
* ``updates``: per-row squared weight and update norms;
* ``weights``: weight statistics and ``Σ g·w`` per tensor (:mod:`gradscope.run.weights`);
* ``desync``: DDP replicas whose gradients differed;
* ``action``: what gradscope did about a finding (a learning-rate change, a halt, a stop);
* ``failed``: a step during which gradscope failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradscope.run import budget, records
from gradscope.run.forward_history import FORWARD_FIELDS, ForwardHistory
from gradscope.run.history import STEP_FIELDS, Series
from gradscope.run.info import RunInfo
from gradscope.run.weights import WeightState
from gradscope.stats import layout
from gradscope.stats.tensor_stats import TensorStats

KEPT_EVENTS = 32
"""Non-finite events remembered for the whole run (beyond the history's window)."""

KEPT_ACTIONS = 1000
"""Actions remembered for the whole run (a controller changes the rate a few times per run)."""

INITIAL_LOSSES = 64
"""First finite losses, and first non-zero total gradient norms, remembered for the whole run
(underfitting and gradient spikes are judged against them)."""


@dataclass(frozen=True)
class NonfiniteEvent:
    """A sampled step whose gradients held NaN/Inf.

    ``rows`` are the affected rows, first in backward order (the row whose gradient went
    bad first, i.e. nearest the loss) when that order is known, else in reverse model order.
    """

    step: int
    rows: tuple[int, ...]
    nans: int
    infs: int
    backward_order_known: bool
    rank: int = -1  # distributed: the lowest rank whose gradient of rows[0] held NaN/Inf (-1: unknown)
    ranks: int = 0  # distributed: how many ranks' gradients did


class RunState:
    """History plus the events a report must never forget, fed by records."""

    def __init__(self, info: RunInfo) -> None:
        self.info = info
        self.plan = budget.plan_of(info)  # the history's sizes under the run's memory budget
        self.history = self.plan.build(info.rows)
        self.nonfinite_events: list[NonfiniteEvent] = []
        self.nonfinite_steps = 0
        self.desync_events: list[records.Desync] = []
        self.desync_steps = 0
        self.first_bad_loss: tuple[int, float] | None = None
        self.initial_losses: list[float] = []
        self.initial_grad_norms: list[float] = []
        self.forward = ForwardHistory(info.modules) if info.modules else None
        self.actions: list[records.Action] = []
        self.weights: WeightState | None = None  # from the first weight reading (compression=True)

    # ---- records ------------------------------------------------------------------------

    def apply(self, record: records.Record) -> None:
        """Apply one record (see :mod:`gradscope.run.records`)."""
        if isinstance(record, records.Sampled):
            self.add_sampled(
                record.step, record.rows, record.present, record.order, record.nonfinite_rank, record.nonfinite_ranks
            )
        elif isinstance(record, records.Forward):
            if self.forward is not None:
                self.forward.add(record)
        elif isinstance(record, records.StepValues):
            self.add_step(record.step, record.values)
        elif isinstance(record, records.Metrics):
            self.add_metrics(record.step, record.values)
        elif isinstance(record, records.Updates):
            self.add_updates(record.step, record.weight_sq, record.update_sq)
        elif isinstance(record, records.Weights):
            if self.weights is None:
                self.weights = WeightState(len(self.info.rows))
            self.weights.add(record)
        elif isinstance(record, records.Desync):
            self.add_desync(record)
        elif isinstance(record, records.Action):
            if len(self.actions) < KEPT_ACTIONS:
                self.actions.append(record)
        elif isinstance(record, records.Failed):
            self.mark_failed(record.step)

    def add_sampled(
        self,
        step: int,
        rows: np.ndarray,
        present: np.ndarray,
        order: np.ndarray,
        nonfinite_rank: np.ndarray | None = None,
        nonfinite_ranks: np.ndarray | None = None,
    ) -> None:
        """A sampled step: float64 ``(R, ROW_WIDTH)`` rows, bool ``(R,)`` presence, int ``(R,)``
        backward order (-1 where unknown); distributed runs add, per row, the lowest rank
        whose gradient held NaN/Inf and how many ranks did."""
        self.history.add_sampled(step, rows, present, order)
        if present.any() and len(self.initial_grad_norms) < INITIAL_LOSSES:
            total = float(np.sqrt(rows[present, layout.SUMSQ].sum()))
            if np.isfinite(total) and total > 0:
                self.initial_grad_norms.append(total)
        bad = present & (rows[:, layout.NANS] + rows[:, layout.INFS] > 0)
        if not bad.any():
            return
        self.nonfinite_steps += 1
        if len(self.nonfinite_events) >= KEPT_EVENTS:
            return
        affected = np.flatnonzero(bad)
        known = bool((order[affected] >= 0).all())
        # First in backward order (nearest the loss); without it, last in model order.
        affected = affected[np.argsort(order[affected], kind="stable")] if known else affected[::-1]
        self.nonfinite_events.append(
            NonfiniteEvent(
                step=step,
                rows=tuple(int(r) for r in affected),
                nans=int(rows[bad, layout.NANS].sum()),
                infs=int(rows[bad, layout.INFS].sum()),
                backward_order_known=known,
                rank=int(nonfinite_rank[affected[0]]) if nonfinite_rank is not None else -1,
                ranks=int(nonfinite_ranks[affected[0]]) if nonfinite_ranks is not None else 0,
            )
        )

    def add_desync(self, record: records.Desync) -> None:
        """DDP replicas disagreed (the first ``KEPT_EVENTS`` are kept for the whole run)."""
        self.desync_steps += 1
        if len(self.desync_events) < KEPT_EVENTS:
            self.desync_events.append(record)

    def add_step(self, step: int, values: dict[str, float]) -> None:
        """A step's scalar values: ``STEP_FIELDS`` (loss, step_time, ...) and step metrics."""
        loss = values.get("loss")
        if loss is not None:
            finite = math.isfinite(loss)
            if not finite and self.first_bad_loss is None:
                self.first_bad_loss = (step, float(loss))
            elif finite and len(self.initial_losses) < INITIAL_LOSSES:
                self.initial_losses.append(float(loss))
        self.history.add_step(step, **{k: v for k, v in values.items() if k in STEP_FIELDS})
        metrics = {k: v for k, v in values.items() if k not in STEP_FIELDS}
        if metrics:
            self.history.add_metrics(step, metrics)

    def add_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.history.add_metrics(step, metrics)

    def add_updates(self, step: int, weight_sq: np.ndarray, update_sq: np.ndarray) -> None:
        self.history.add_updates(step, weight_sq, update_sq)

    def mark_failed(self, step: int) -> None:
        self.history.mark_failed(step)

    # ---- reading ------------------------------------------------------------------------

    def series(self, name: str, last: int | None = None) -> Series:
        if name in FORWARD_FIELDS:
            if self.forward is None:
                raise KeyError(f"{name!r} needs watch(..., forward=True)")
            values, steps = self.forward.series(name)
            if last is not None:
                keep = max(len(steps) - last, 0)
                values, steps = values[keep:], steps[keep:]
            return Series(name, values, steps, self.info.modules)
        return self.history.series(name, last)

    def fields(self) -> tuple[str, ...]:
        return self.history.fields() + (FORWARD_FIELDS if self.forward is not None else ())

    def stats(self, step: int | None = None) -> TensorStats:
        """Statistics of the rows present at a sampled ``step`` (default: the latest)."""
        if step is None:
            step = self.history.latest_sampled()
        found = self.history.sampled_rows(step) if step >= 0 else None
        if found is None:
            raise KeyError(f"step {step} is not a kept sampled step")
        rows, present = found
        return TensorStats.from_rows(rows[present], tuple(np.array(self.info.rows, dtype=object)[present]))
