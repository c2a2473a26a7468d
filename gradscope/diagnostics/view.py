"""``RunView``: the slice of a monitor's history that the health checks read.

Gradient checks look at the newest sampled steps (a bounded window, so a report stays cheap
to compute every step); loss checks read every kept per-step value with vectorised
operations; events that must not be forgotten (the first non-finite gradient or loss) are
tracked by the monitor as they happen and passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradscope.records import Desync


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
    step_time: np.ndarray
    peak_memory: np.ndarray
    energy: np.ndarray
    metrics: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    nonfinite_events: tuple[NonfiniteEvent, ...] = ()
    nonfinite_steps: int = 0
    desync_events: tuple[Desync, ...] = ()  # DDP replicas that disagreed, as recorded
    desync_steps: int = 0
    world: int = 1  # ranks of a distributed run
    first_bad_loss: tuple[int, float] | None = None
    initial_loss: float | None = None  # mean loss of the run's first steps
    summary: dict = field(default_factory=dict)
    latest_hist: np.ndarray | None = None  # (R, 64): each row's histogram at its latest present step
    backward_order: np.ndarray | None = None  # (S, R): 0 = final first (nearest the loss), -1 unknown, NaN absent

    @property
    def rms(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(self.sumsq / np.maximum(self.finite, 1))

    @property
    def rms_nonzero(self) -> np.ndarray:
        """rms over the non-zero finite elements (NaN when there are none): the magnitude of
        the gradients a layer does receive, independent of how sparse they are."""
        nonzero = self.finite - self.zeros
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(nonzero > 0, np.sqrt(self.sumsq / np.maximum(nonzero, 1)), np.nan)

    @property
    def zero_frac(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.zeros / np.maximum(self.numel, 1)

    @property
    def total_norm(self) -> np.ndarray:
        """``(S,)`` L2 norm of every present gradient together, per sampled step."""
        return np.sqrt(np.nansum(self.sumsq, axis=1))


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
    """Trailing mean over ``window`` values, ignoring NaN (NaN where the window has none)."""
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
