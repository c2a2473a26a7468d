"""``RunView``: the slice of a run's state that the health checks read, and helpers they share.

Gradient checks look at the newest sampled steps (a bounded window, so a report stays cheap
to compute every step); loss checks read every kept per-step value with vectorised
operations; events that must not be forgotten (the first non-finite gradient or loss) are
remembered by the :class:`~gradscope.run.state.RunState` as they happen and passed in.
:func:`view_of` cuts the view out of a ``RunState``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradscope.health.thresholds import Thresholds
from gradscope.run.forward_history import ForwardNonfinite
from gradscope.run.info import SiblingGroup
from gradscope.run.records import Action, Desync, Forward
from gradscope.run.state import NonfiniteEvent, RunState
from gradscope.stats import layout


@dataclass(frozen=True)
class RunView:
    """Arrays of a run. Per-row arrays are ``(S, R)`` over the newest sampled steps, NaN
    where a row was absent; per-step arrays are ``(N,)`` over the kept steps."""

    rows: tuple[str, ...]
    row_types: tuple[str, ...]
    sampled_steps: np.ndarray
    present: np.ndarray
    numel: np.ndarray
    finite: np.ndarray
    zeros: np.ndarray
    nonfinite: np.ndarray
    sumsq: np.ndarray
    max_abs: np.ndarray
    update_ratio: np.ndarray | None
    weight_norm: np.ndarray | None
    steps: np.ndarray
    loss: np.ndarray
    skipped: np.ndarray
    grad_scale: np.ndarray  # a GradScaler's scale per step (NaN without one)
    step_time: np.ndarray
    peak_memory: np.ndarray
    energy: np.ndarray
    metrics: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    nonfinite_events: tuple[NonfiniteEvent, ...] = ()
    nonfinite_steps: int = 0
    desync_events: tuple[Desync, ...] = ()  # DDP replicas that disagreed, as recorded
    desync_steps: int = 0
    world: int = 1  # ranks of a distributed run
    topology: str = "single"  # how the model is spread over them: "single", "replicated" (DDP), "sharded" (FSDP2)
    first_bad_loss: tuple[int, float] | None = None
    initial_loss: float | None = None  # mean loss of the run's first steps
    initial_grad_norm: float | None = None  # largest total gradient norm of the run's first sampled steps
    summary: dict = field(default_factory=dict)
    latest_hist: np.ndarray | None = None  # (R, 64): each row's newest kept histogram (NaN: none)
    latest_hist_step: np.ndarray | None = None  # (R,): the step it is from (-1: none)
    latest_hist_max_abs: np.ndarray | None = None  # (R,): the row's max_abs at that step
    backward_order: np.ndarray | None = None  # (S, R): 0 = final first (nearest the loss), -1 unknown, NaN absent
    row_dtypes: tuple[str, ...] = ()  # gradient dtype per row ("" or absent: unknown)
    modules: tuple[str, ...] = ()  # forward statistics: module names (empty: forward statistics off)
    module_types: tuple[str, ...] = ()
    forward_steps: np.ndarray | None = None  # (F,) sampled steps with forward statistics kept
    forward_events: tuple[ForwardNonfinite, ...] = ()  # the first forward steps that held NaN/Inf
    forward_latest: Forward | None = None  # the newest forward record (outputs, inputs, dtypes)
    actions: tuple[Action, ...] = ()  # what gradscope did about its findings (gradscope.actions)
    sibling_groups: tuple[SiblingGroup, ...] = ()  # experts of a mixture of experts, and the like

    def loss_state(self, step: int) -> str:
        """Whether the loss of ``step`` was ``"finite"``, ``"nonfinite"`` or ``"unknown"`` (not
        recorded: the history keeps a missing loss as NaN too, so a NaN counts as non-finite only
        at or after the run's first non-finite loss)."""
        found = np.flatnonzero(self.steps == step)
        value = float(self.loss[found[-1]]) if found.size else float("nan")
        if np.isfinite(value):
            return "finite"
        if np.isinf(value) or (self.first_bad_loss is not None and self.first_bad_loss[0] <= step and found.size):
            return "nonfinite"
        return "unknown"

    def _derived(self, name: str) -> np.ndarray:
        return layout.derive(
            name, {"numel": self.numel, "finite": self.finite, "zeros": self.zeros, "sumsq": self.sumsq}
        )

    @property
    def rms(self) -> np.ndarray:
        """``(S, R)`` rms of each row's finite elements (see :data:`gradscope.stats.layout.DERIVED_FIELDS`)."""
        return self._derived("rms")

    @property
    def norm(self) -> np.ndarray:
        """``(S, R)`` L2 norm of each row's finite elements."""
        return self._derived("norm")

    @property
    def rms_nonzero(self) -> np.ndarray:
        """rms over the non-zero finite elements (NaN when there are none): the magnitude of
        the gradients a layer does receive, independent of how sparse they are."""
        return self._derived("rms_nonzero")

    @property
    def zero_frac(self) -> np.ndarray:
        """``(S, R)`` fraction of each row's elements that are exactly zero."""
        return self._derived("zero_frac")

    def latest(self, values: np.ndarray) -> np.ndarray:
        """``(R,)``: each row's entry of ``(S, R)`` ``values`` at its latest present sampled step
        (NaN for a row never present in the window)."""
        if not len(self.present):
            return np.full(len(self.rows), np.nan)
        index, seen = latest_present(self.present)
        return np.where(seen, values[index, np.arange(values.shape[1])], np.nan)

    @property
    def total_norm(self) -> np.ndarray:
        """``(S,)`` L2 norm of every present gradient together, per sampled step."""
        return np.sqrt(np.nansum(self.sumsq, axis=1))


def view_of(state: RunState, thresholds: Thresholds) -> RunView | None:
    """The arrays the health checks read from ``state`` (None before the first step)."""
    h = state.history
    info = state.info
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
    # Each row's newest histogram (histograms come on a cadence, and where gradients trigger
    # them: the newest is not always the latest sampled step's), with its step and max_abs.
    # A row with no gradient in the window keeps none (its report row is "absent").
    latest_hist, latest_hist_step, latest_hist_max_abs = h.latest_histograms()
    if len(present):
        stale = ~present.values.any(axis=0) & (latest_hist_step < present.steps[0])
        latest_hist[stale], latest_hist_step[stale], latest_hist_max_abs[stale] = np.nan, -1, np.nan
    tracked = info.track_updates
    initial = state.initial_losses[: thresholds.smooth]
    return RunView(
        rows=info.rows,
        row_types=info.row_types,
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
        grad_scale=steps("grad_scale"),
        step_time=steps("step_time"),
        peak_memory=steps("peak_memory"),
        energy=steps("energy"),
        metrics=metrics,
        nonfinite_events=tuple(state.nonfinite_events),
        nonfinite_steps=state.nonfinite_steps,
        desync_events=tuple(state.desync_events),
        desync_steps=state.desync_steps,
        world=int(info.extra.get("distributed", {}).get("world", 1)),
        topology=str(info.extra.get("distributed", {}).get("kind", "single")),
        first_bad_loss=state.first_bad_loss,
        actions=tuple(state.actions),
        initial_loss=float(np.mean(initial)) if initial else None,
        initial_grad_norm=(
            float(np.max(state.initial_grad_norms[: thresholds.smooth])) if state.initial_grad_norms else None
        ),
        summary=dict(info.summary),
        latest_hist=latest_hist,
        latest_hist_step=latest_hist_step,
        latest_hist_max_abs=latest_hist_max_abs,
        backward_order=rows("backward_order"),
        row_dtypes=info.row_dtypes,
        modules=info.modules,
        module_types=info.module_types,
        forward_steps=state.forward.steps() if state.forward is not None else None,
        forward_events=tuple(state.forward.events) if state.forward is not None else (),
        forward_latest=state.forward.latest if state.forward is not None else None,
        sibling_groups=info.sibling_rows,
    )


def latest_present(present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of a bool ``(S, R)`` presence array: the index of its last True entry, and
    whether it has one (where it has none the index is meaningless)."""
    return len(present) - 1 - np.argmax(present[::-1], axis=0), present.any(axis=0)


def trailing_run(mask: np.ndarray, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per column of a bool ``(S, R)`` array: how many of the newest *present* entries are
    all True, and the row index where that run starts (``S`` when the run is empty).

    Absent entries (a layer without gradient in a step) neither break nor extend a run.
    """
    if present is None:
        present = np.ones(mask.shape, dtype=bool)
    if mask.shape[0] == 0:
        return np.zeros(mask.shape[1:], dtype=np.int64), np.zeros(mask.shape[1:], dtype=np.int64)
    holds = (mask | ~present)[::-1]
    block = np.where(holds.all(axis=0), mask.shape[0], np.argmin(holds, axis=0))  # rows in the trailing block
    counted = np.cumsum(present[::-1], axis=0)
    count = np.where(block > 0, counted[np.maximum(block - 1, 0), np.arange(mask.shape[1])], 0)
    first = mask.shape[0] - block
    # The run starts at the block's first present entry.
    starts = np.array(
        [first[c] + int(np.argmax(present[first[c] :, c])) if count[c] else mask.shape[0] for c in range(mask.shape[1])]
    )
    return count, starts


def for_steps(count: int, start: int) -> str:
    """'for N sampled steps', saying 'at least' when the run reaches back to the window's start."""
    return f"for {'at least ' if start == 0 else ''}{count} sampled steps"


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` values, ignoring non-finite ones (NaN where the window has none)."""
    ok = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(ok, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(ok)])
    lo = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    hi = np.arange(1, len(values) + 1)
    n = counts[hi] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[hi] - sums[lo]) / np.maximum(n, 1), np.nan)


def steady_rise(values: np.ndarray) -> tuple[float, float]:
    """(slope per step, correlation) of a straight line fitted to ``values`` (finite ones)."""
    x = np.arange(len(values), dtype=np.float64)
    ok = np.isfinite(values)
    if ok.sum() < 3:
        return 0.0, 0.0
    x, y = x[ok], values[ok]
    if np.ptp(y) == 0:
        return 0.0, 0.0
    slope = np.polyfit(x, y, 1)[0]
    return float(slope), float(np.corrcoef(x, y)[0, 1])


def layer_list(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
