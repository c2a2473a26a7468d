"""The history's memory budget: what a :class:`~gradscope.run.history.History` costs, and the
sizes a budget gives it (``watch(history_mib=512)``).

The bytes (exact integers, :func:`history_bytes`; the History module docstring spells them
out) grow with the row count: per row, 61 bytes per sampled step kept and 265 per step with
histograms kept, so the defaults (``history=10_000``, ``hist_history=1_000``) cost 875 kB per
row: 175 MB for 200 rows, 8.75 GB for 10 000. A budget of ``B`` bytes caps that
(:func:`plan_history`), in exact integer arithmetic:

* ``asked`` = the bytes of the sizes asked for. If ``asked <= B``, they are kept as asked.
* Otherwise the per-step ring (row-independent) is kept as asked and the two per-row rings
  share what is left, ``room = B - step bytes``: the histogram ring is shortened by the
  factor ``room / rings`` (``rings``: their bytes as asked), ``hist_capacity = hist_history
  * room // rings``, and the sampled ring takes the rest, ``capacity = (room - hist_capacity
  * hist slot) // sampled slot`` (no more than ``history``). Each keeps at least 1 slot:
  the only case where ``B`` is exceeded (from about 1.6 million rows at 512 MiB), and then
  said in the warning.
* The older part of the sampled ring is thinned so that it still reaches back ``history``
  sampled steps, as little as that allows: at most ``t = min(capacity // 2, capacity -
  MIN_DENSE)`` slots (none if that is below 1) may hold older steps, one in ``stride``; the
  stride is the smallest with which ``t`` of them reach back far enough, ``stride =
  ceil((history - capacity + t) / t)``, and the dense part (the newest steps, every one) the
  largest that stride allows, ``dense = (capacity * stride - history) // (stride - 1)``, so
  that ``dense + (capacity - dense) * stride >= history``
  (:mod:`gradscope.run.history` says which steps that keeps).

A monitor whose budget keeps less than it asked for warns once, naming the numbers
(:meth:`HistoryPlan.warning`); so does ``load_run`` of its log.

Why the newest steps stay dense: the health checks read the newest
``max(sustain, spike_window + 1, trend_window)`` sampled steps (51 with the default
thresholds) as consecutive steps ("for N sampled steps in a row", a running median, a
trend), and ``MIN_DENSE`` keeps at least 64 of them dense whenever the budget holds 64 steps.
Plots and ``history()`` get the whole span asked for, at a coarser resolution in its older
part, rather than a shorter one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gradscope.run.history import STEP_FIELDS, History
from gradscope.stats import layout

if TYPE_CHECKING:
    from gradscope.run.info import RunInfo

HISTORY_MIB = 512
"""Default of ``watch(history_mib=)``: MiB one monitor's history may take."""

MIN_DENSE = 64
"""Newest sampled steps kept every one, when the budget holds that many (above the checks' default
window of 51)."""

STEP_SLOT_BYTES = 8 + 8 * len(STEP_FIELDS) + 1
"""Bytes per per-step slot: its int64 step, float64 ``STEP_FIELDS`` and the ``failed`` flag
(each logged metric adds 8, allocated when first logged)."""


def sampled_row_bytes(track_updates: bool = False) -> int:
    """Bytes per row per sampled slot: float64 scalars, bool present, int32 backward order, and
    with update tracking two float64 squared norms."""
    return 8 * len(layout.SCALAR_FIELDS) + 1 + 4 + (16 if track_updates else 0)


def hist_row_bytes(hist_dtype=np.uint32) -> int:
    """Bytes per row per histogram slot: the counts, the row's float64 ``max_abs``, a bool."""
    return layout.NUM_BINS * np.dtype(hist_dtype).itemsize + 8 + 1


def history_bytes(
    rows: int,
    capacity: int,
    hist_capacity: int,
    step_capacity: int,
    track_updates: bool = False,
    hist_dtype=np.uint32,
) -> int:
    """Bytes a :class:`History` of these sizes allocates up front, logged metrics aside (each
    sampled and histogram slot also holds its int64 step)."""
    return (
        capacity * (8 + rows * sampled_row_bytes(track_updates))
        + hist_capacity * (8 + rows * hist_row_bytes(hist_dtype))
        + step_capacity * STEP_SLOT_BYTES
    )


def step_capacity(history: int, every: int) -> int:
    """Steps whose per-step values are kept: those ``history`` sampled steps span, at most 2**20
    (and never fewer than ``history``)."""
    return min(history * every, max(history, 1 << 20))


@dataclass(frozen=True)
class HistoryPlan:
    """The sizes of one :class:`History` (see the module docstring).

    Attributes:
        rows: rows of the history.
        every: the sampling period.
        history, hist_history: sampled steps, and steps with histograms, asked for
            (``hist_history`` no more than ``history``).
        capacity: sampled-step slots; ``dense`` of them hold the newest steps, every one,
            the others one older step in ``stride``.
        hist_capacity: histogram slots.
        step_capacity: per-step slots.
        track_updates: whether update norms are kept.
        hist_dtype: name of the histogram counts' dtype.
        history_mib: the budget, in MiB.
        nbytes: bytes allocated (:func:`history_bytes`).
        asked_bytes: bytes the sizes asked for would take.
    """

    rows: int
    every: int
    history: int
    hist_history: int
    capacity: int
    dense: int
    stride: int
    hist_capacity: int
    step_capacity: int
    track_updates: bool
    hist_dtype: str
    history_mib: int
    nbytes: int
    asked_bytes: int

    @property
    def shortened(self) -> bool:
        """Whether the budget keeps less than was asked for."""
        return self.capacity < self.history or self.hist_capacity < self.hist_history

    @property
    def warns(self) -> bool:
        """Whether to warn: the budget keeps less than asked, or cannot be kept (one slot of each ring
        is the least a history holds)."""
        return self.shortened or self.nbytes > self.history_mib * 2**20

    def build(self, row_names: tuple[str, ...]) -> History:
        """An empty :class:`History` of these sizes."""
        if len(row_names) != self.rows:
            raise ValueError(f"a history plan for {self.rows} rows given {len(row_names)} names")
        return History(
            row_names,
            every=self.every,
            capacity=self.capacity,
            hist_capacity=self.hist_capacity,
            step_capacity=self.step_capacity,
            track_updates=self.track_updates,
            hist_dtype=np.dtype(self.hist_dtype),
            dense=self.dense,
            stride=self.stride,
        )

    def warning(self, caller: str = "watch") -> str:
        """What the budget keeps, the numbers behind it and how to keep everything; ``caller``
        names the function taking ``history_mib`` (``"watch"``, ``"load_run"``)."""
        per_step = 8 + self.rows * sampled_row_bytes(self.track_updates)
        per_hist = 8 + self.rows * hist_row_bytes(self.hist_dtype)
        older = self.capacity - self.dense
        kept = f"the newest {self.dense} sampled steps"
        if older:
            reach = self.dense + older * self.stride
            kept += f", then one in {self.stride} back to {reach} sampled steps"
        over = ""
        if self.nbytes > self.history_mib * 2**20:
            over = (
                f"; more than history_mib={self.history_mib} allows: a history keeps at least one sampled step "
                "and one with histograms"
            )
        return (
            f"gradscope: history_mib={self.history_mib} keeps {self.capacity} sampled-step slots for the "
            f"history={self.history} sampled steps asked for: {self.rows} rows take {per_step} bytes per sampled "
            f"step and {per_hist} per step with histograms, {self.asked_bytes} bytes in all "
            f"({-(-self.asked_bytes // 2**20)} MiB). Kept ({self.nbytes} bytes): {kept}, and the histograms of the "
            f"newest {self.hist_capacity} of {self.hist_history} steps that have them{over}. To keep everything: "
            f"{caller}(..., history_mib={-(-self.asked_bytes // 2**20)}) or more"
        )


def plan_history(
    rows: int,
    every: int,
    history: int,
    hist_history: int,
    *,
    track_updates: bool = False,
    hist_dtype=np.uint32,
    history_mib: int = HISTORY_MIB,
) -> HistoryPlan:
    """The sizes of a history of ``rows`` rows under a budget of ``history_mib`` MiB (module
    docstring); ``history``, ``hist_history``: the sampled steps, and steps with histograms,
    asked for."""
    hist_history = min(hist_history, history)
    steps = step_capacity(history, every)
    asked = history_bytes(rows, history, hist_history, steps, track_updates, hist_dtype)
    capacity, hist_capacity, dense, stride = history, hist_history, history, 1
    if asked > history_mib * 2**20:
        room = max(history_mib * 2**20 - steps * STEP_SLOT_BYTES, 0)
        rings = asked - steps * STEP_SLOT_BYTES
        hist_capacity = max(hist_history * room // rings, 1)
        sampled_slot = 8 + rows * sampled_row_bytes(track_updates)
        capacity = max(
            min(history, (room - hist_capacity * (8 + rows * hist_row_bytes(hist_dtype))) // sampled_slot), 1
        )
        dense, thinned = capacity, max(min(capacity // 2, capacity - MIN_DENSE), 0)
        if thinned:  # the smallest stride that reaches back `history`, then the most dense slots it allows
            stride = -(-(history - capacity + thinned) // thinned)
            dense = (capacity * stride - history) // (stride - 1)
    return HistoryPlan(
        rows=rows,
        every=every,
        history=history,
        hist_history=hist_history,
        capacity=capacity,
        dense=dense,
        stride=stride,
        hist_capacity=hist_capacity,
        step_capacity=steps,
        track_updates=track_updates,
        hist_dtype=np.dtype(hist_dtype).name,
        history_mib=history_mib,
        nbytes=history_bytes(rows, capacity, hist_capacity, steps, track_updates, hist_dtype),
        asked_bytes=asked,
    )


def plan_of(info: RunInfo, history_mib: int | None = None) -> HistoryPlan:
    """The plan of a run's history: its :class:`RunInfo`'s sizes and budget (or ``history_mib``),
    with ``uint32`` histogram counts unless a row can hold 2**32 elements or more."""
    return plan_history(
        len(info.rows),
        info.every,
        info.history,
        info.hist_history,
        track_updates=info.track_updates,
        hist_dtype=np.uint32 if max(info.row_numel, default=0) < 2**32 else np.int64,
        history_mib=info.history_mib if history_mib is None else history_mib,
    )
