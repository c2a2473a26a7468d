"""``RunState``: what is known about a training run, built from records.

A live :class:`gradscope.Monitor` feeds it records as measurements reach the host; a run log
(:mod:`gradscope.runlog`) holds the same records, and replaying them into a new ``RunState``
rebuilds the same history, the same remembered events and therefore the same report. The
records are:

* ``sampled``: a sampled step's per-row statistics rows, presence and backward order;
* ``step``: a step's scalar values (loss, step time, memory, energy, scale, step metrics);
* ``metrics``: metrics logged with ``mon.log``;
* ``updates``: per-row squared weight and update norms;
* ``desync``: DDP replicas whose gradients differed;
* ``failed``: a step during which gradscope failed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from gradscope import layout, records
from gradscope.diagnostics import NonfiniteEvent, RunView
from gradscope.history import STEP_FIELDS, History, Series
from gradscope.report import HealthReport, build
from gradscope.tensor_stats import TensorStats
from gradscope.thresholds import Thresholds

KEPT_EVENTS = 32
"""Non-finite events remembered for the whole run (beyond the history's window)."""

INITIAL_LOSSES = 64
"""First finite losses remembered for the whole run (underfitting is judged against them)."""


@dataclass(frozen=True)
class RunInfo:
    """What describes a run as a whole (the header of its log).

    Attributes:
        rows: names of the reported rows (layers or parameters).
        row_types: class names of the modules owning them.
        summary: parameters, trainable parameters, bytes and layers of the model.
        every: sampling period.
        mode: ``"backward"`` or ``"step"``.
        granularity: ``"layer"`` or ``"parameter"``.
        history: sampled steps kept in memory.
        hist_history: sampled steps whose histograms are kept.
        track_updates: whether update norms are recorded.
        row_numel: elements per row when all its parameters have gradients.
        extra: anything else recorded with the run (versions, creation time).
    """

    rows: tuple[str, ...]
    row_types: tuple[str, ...]
    summary: dict
    every: int
    mode: str
    granularity: str
    history: int
    hist_history: int
    track_updates: bool
    row_numel: tuple[int, ...]
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunInfo:
        data = dict(data)
        for name in ("rows", "row_types", "row_numel"):
            data[name] = tuple(data[name])
        return cls(**data)


class RunState:
    """History plus the events a report must never forget, fed by records."""

    def __init__(self, info: RunInfo) -> None:
        self.info = info
        self.history = History(
            info.rows,
            every=info.every,
            capacity=info.history,
            hist_capacity=min(info.hist_history, info.history),
            step_capacity=min(info.history * info.every, max(info.history, 1 << 20)),
            track_updates=info.track_updates,
            hist_dtype=np.uint32 if max(info.row_numel, default=0) < 2**32 else np.int64,
        )
        self.nonfinite_events: list[NonfiniteEvent] = []
        self.nonfinite_steps = 0
        self.desync_events: list[records.Desync] = []
        self.desync_steps = 0
        self.first_bad_loss: tuple[int, float] | None = None
        self.initial_losses: list[float] = []

    # ---- records ------------------------------------------------------------------------

    def apply(self, record: records.Record) -> None:
        """Apply one record (see :mod:`gradscope.records`)."""
        if isinstance(record, records.Sampled):
            self.add_sampled(
                record.step, record.rows, record.present, record.order, record.nonfinite_rank, record.nonfinite_ranks
            )
        elif isinstance(record, records.StepValues):
            self.add_step(record.step, record.values)
        elif isinstance(record, records.Metrics):
            self.add_metrics(record.step, record.values)
        elif isinstance(record, records.Updates):
            self.add_updates(record.step, record.weight_sq, record.update_sq)
        elif isinstance(record, records.Desync):
            self.add_desync(record)
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
            if not np.isfinite(loss) and self.first_bad_loss is None:
                self.first_bad_loss = (step, float(loss))
            elif np.isfinite(loss) and len(self.initial_losses) < INITIAL_LOSSES:
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
        return self.history.series(name, last)

    def fields(self) -> tuple[str, ...]:
        return self.history.fields()

    def stats(self, step: int | None = None) -> TensorStats:
        """Statistics of the rows present at a sampled ``step`` (default: the latest)."""
        if step is None:
            step = self.history.latest_sampled()
        found = self.history.sampled_rows(step) if step >= 0 else None
        if found is None:
            raise KeyError(f"step {step} is not a kept sampled step")
        rows, present = found
        return TensorStats.from_rows(rows[present], tuple(np.array(self.info.rows, dtype=object)[present]))

    def report(self, thresholds: Thresholds) -> HealthReport:
        if not isinstance(thresholds, Thresholds):
            raise TypeError(f"report: thresholds must be a gradscope.Thresholds, got {type(thresholds).__name__}")
        return build(self.view(thresholds), thresholds, self.info.rows, self.info.row_types, self.info.summary)

    def view(self, thresholds: Thresholds) -> RunView | None:
        """The arrays the health checks read (None before the first step)."""
        h = self.history
        window = max(thresholds.sustain, thresholds.spike_window + 1, thresholds.trend_window)
        present = h.series("present", last=window)
        loss = h.series("loss")
        if len(present) == 0 and len(loss) == 0:
            return None

        def rows(name: str) -> np.ndarray:
            return h.series(name, last=window).values

        def steps(name: str) -> np.ndarray:
            return h.series(name).values

        metrics = {}
        for name in h.metric_names:
            series = h.series(name)
            ok = np.isfinite(series.values)
            metrics[name] = (series.steps[ok], series.values[ok])
        # Each row's histogram at its latest sampled step with a gradient (when still kept).
        n_rows = len(self.info.rows)
        latest_hist = np.full((n_rows, layout.NUM_BINS), np.nan)
        if len(present):
            seen = present.values.any(axis=0)
            newest = len(present) - 1 - np.argmax(present.values[::-1], axis=0)
            for index in np.unique(newest[seen]):
                found = h.sampled_rows(int(present.steps[index]))
                if found is not None:
                    members = seen & (newest == index)
                    latest_hist[members] = found[0][members, layout.HIST :]
        tracked = self.info.track_updates
        initial = self.initial_losses[: thresholds.smooth]
        return RunView(
            rows=self.info.rows,
            row_types=self.info.row_types,
            sampled_steps=present.steps,
            present=present.values,
            numel=rows("numel"),
            finite=rows("finite"),
            zeros=rows("zeros"),
            nonfinite=rows("nonfinite"),
            sumsq=rows("sumsq"),
            max_abs=rows("max_abs"),
            update_ratio=rows("update_ratio") if tracked else None,
            weight_norm=rows("weight_norm") if tracked else None,
            steps=loss.steps,
            loss=loss.values,
            skipped=steps("skipped"),
            step_time=steps("step_time"),
            peak_memory=steps("peak_memory"),
            energy=steps("energy"),
            metrics=metrics,
            nonfinite_events=tuple(self.nonfinite_events),
            nonfinite_steps=self.nonfinite_steps,
            desync_events=tuple(self.desync_events),
            desync_steps=self.desync_steps,
            world=int(self.info.extra.get("distributed", {}).get("world", 1)),
            first_bad_loss=self.first_bad_loss,
            initial_loss=float(np.mean(initial)) if initial else None,
            summary=dict(self.info.summary),
            latest_hist=latest_hist,
            backward_order=rows("backward_order"),
        )
