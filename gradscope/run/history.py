"""The monitor's bounded in-memory history: ring buffers of NumPy arrays.

Two rings, both of fixed size from the start so memory stays flat however long training
runs:

* per sampled step and row (layer or parameter): the statistics row's scalars, whether
  the row was present, its backward order, its update norms; histograms in a third,
  shorter ring (they are 64 counts per row) that holds only the sampled steps that have
  any (``watch(histogram_every=N)`` computes them on one sampled step in N, and on steps
  whose gradients trigger them: :mod:`gradscope.stats.layout`), with which rows have one;
* per step (every step, sampled or not): loss, step time, peak memory, energy, the
  GradScaler scale and any logged metrics.

A per-step slot belongs to ``step`` modulo its capacity; writes for a step whose slot has
since been reused are dropped. The histogram ring is filled in order of arrival (its steps
are not evenly spaced). The sampled ring has two parts: ``dense`` slots for the newest
sampled steps, every one (sampled step ``k = step // every`` in slot ``k % dense``), and
``capacity - dense`` slots for older ones, thinned: a step leaving the dense part is kept
there only if ``k % stride == 0`` (slot ``dense + (k // stride) % (capacity - dense)``).
With every sampled step written, in order, and ``n`` the newest, the ring holds

    ``n - dense < k <= n``, and the newest ``capacity - dense`` multiples of ``stride`` below those.

``dense = capacity`` (the default) is a plain ring of the newest ``capacity`` sampled steps.

Memory, all allocated up front (:func:`gradscope.run.budget.history_bytes`), in bytes:

    ``capacity * (8 + rows * S) + hist_capacity * (8 + rows * H) + step_capacity * 49``

``S = 61`` per row per sampled step (7 float64 scalars, bool present, int32 order; 77 with
update tracking: two float64 norms more), ``H = 265`` per row per step with histograms (64
``uint32`` counts, the row's float64 ``max_abs``, a bool; 521 with ``int64`` counts), 49 per
step (int64 step, 5 float64 values, the ``failed`` flag; each logged metric adds 8 when first
logged). ``watch(history_mib=512)`` caps the total: where the ``history`` and ``hist_history``
asked for do not fit, the histogram ring is shortened by the factor that fits, the sampled
ring takes the rest and its older steps are thinned (:mod:`gradscope.run.budget`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gradscope.stats import formats, layout

STEP_FIELDS = ("loss", "step_time", "peak_memory", "energy", "grad_scale")
"""Per-step values: loss, seconds since the previous step, peak memory in bytes (running
peak: CUDA allocator on GPU, process max RSS on CPU), energy in joules since the previous
step (NVML), and the GradScaler scale the step's gradients were multiplied by."""

ROW_FIELDS = (*layout.SCALAR_FIELDS, *layout.DERIVED_FIELDS, "present")
UPDATE_FIELDS = ("weight_norm", "update_norm", "update_ratio")
"""Per-row fields of update tracking, from :func:`update_norms`."""
OTHER_ROW_FIELDS = ("hist", "backward_order", *formats.FP8_FIELDS)
STEP_FLAGS = ("failed", "skipped")
BUILT_IN_FIELDS = frozenset((*ROW_FIELDS, *UPDATE_FIELDS, *OTHER_ROW_FIELDS, *STEP_FIELDS, *STEP_FLAGS))
"""Every history field that is not a logged metric."""


def update_norms(weight_sq: np.ndarray, update_sq: np.ndarray) -> dict[str, np.ndarray]:
    """The :data:`UPDATE_FIELDS` from squared norms (arrays of one shape): ``weight_norm`` =
    ``||w_before||``, ``update_norm`` = ``||w_after - w_before||``, and their ratio
    ``update_ratio`` (inf or NaN where the weight norm is 0)."""
    weight_norm, update_norm = np.sqrt(weight_sq), np.sqrt(update_sq)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"weight_norm": weight_norm, "update_norm": update_norm, "update_ratio": update_norm / weight_norm}


@dataclass(frozen=True)
class Series:
    """Values of one field over steps, oldest first.

    ``values`` is ``(steps,)`` for per-step fields, ``(steps, rows)`` for per-row fields and
    ``(steps, rows, 64)`` for ``"hist"``; absent rows and missing values are NaN. Unpacks as
    ``values, steps, rows = mon.history("norm")`` and converts with ``np.asarray``.
    """

    name: str
    values: np.ndarray
    steps: np.ndarray
    rows: tuple[str, ...] | None

    def __iter__(self) -> Iterator:
        return iter((self.values, self.steps, self.rows))

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.values, dtype=dtype)


class History:
    """Bounded store of a monitor's measurements (see the module docstring).

    Args:
        row_names: names of the rows (layers or parameters).
        every: the sampling period; step ``s`` is sampled when ``s % every == 0``.
        capacity: sampled steps kept.
        hist_capacity: sampled steps with histograms whose histograms are kept (the newest).
        step_capacity: steps whose per-step values are kept.
        track_updates: whether update norms are stored.
        hist_dtype: dtype of histogram counts (``uint32`` unless a row can exceed 2**32 elements).
        dense: of the ``capacity`` slots, those holding the newest sampled steps, every one
            (default: all of them); the others hold older steps thinned to one in ``stride``.
        stride: the thinning of the older sampled steps (module docstring).
    """

    def __init__(
        self,
        row_names: tuple[str, ...],
        every: int,
        capacity: int,
        hist_capacity: int,
        step_capacity: int,
        track_updates: bool = False,
        hist_dtype=np.uint32,
        dense: int | None = None,
        stride: int = 1,
    ) -> None:
        self.row_names = row_names
        self.every = every
        self.dense = capacity if dense is None else dense
        self.stride = stride
        if not 0 < self.dense <= capacity or stride < 1:
            raise ValueError(f"History: need 0 < dense <= capacity and stride >= 1, got {dense}, {capacity}, {stride}")
        rows = len(row_names)
        self._sampled_step = np.full(capacity, -1, dtype=np.int64)
        self._scalars = np.zeros((capacity, rows, len(layout.SCALAR_FIELDS)))
        self._present = np.zeros((capacity, rows), dtype=bool)
        self._order = np.full((capacity, rows), -1, dtype=np.int32)
        self._updates = np.full((capacity, rows, 2), np.nan) if track_updates else None
        self._hist_step = np.full(hist_capacity, -1, dtype=np.int64)
        self._hist = np.zeros((hist_capacity, rows, layout.NUM_BINS), dtype=hist_dtype)
        self._hist_known = np.zeros((hist_capacity, rows), dtype=bool)  # row has a histogram at that step
        self._hist_max_abs = np.zeros((hist_capacity, rows))  # its max_abs then (FP8 scaling reads both)
        self._hist_next = 0  # next slot of the histogram ring
        self._step = np.full(step_capacity, -1, dtype=np.int64)
        self._step_values = np.full((step_capacity, len(STEP_FIELDS)), np.nan)
        self._failed = np.zeros(step_capacity, dtype=bool)
        self._metrics: dict[str, np.ndarray] = {}
        self._writes = 0  # steps written into any ring (invalidates _orders)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # id(ring) -> (writes, oldest-first slots)

    # ---- writing ------------------------------------------------------------------------

    def _step_slot(self, step: int) -> int:
        slot = step % self._step.shape[0]
        if self._step[slot] != step:
            if self._step[slot] > step:
                return -1  # a newer step owns the slot: this one is too old to keep
            self._step[slot] = step
            self._writes += 1
            self._step_values[slot] = np.nan
            self._failed[slot] = False
            for values in self._metrics.values():
                values[slot] = np.nan
        return slot

    def _sampled_slots(self, steps: np.ndarray) -> np.ndarray:
        """The slot holding each of int64 ``steps`` (any steps), -1 where none does."""
        k, thinned = steps // self.every, self._sampled_step.shape[0] - self.dense
        slots = k % self.dense
        slots = np.where(self._sampled_step[slots] == steps, slots, -1)
        if thinned:
            older = self.dense + (k // self.stride) % thinned
            older = np.where(self._sampled_step[older] == steps, older, -1)
            slots = np.maximum(slots, older)  # a step is in one part at most
        return slots

    def _sampled_slot(self, step: int, claim: bool) -> int:
        """The slot of sampled ``step`` (module docstring): found, or claimed when ``claim`` and the
        slot holds no newer step (a claimed dense slot passes its step on to the thinned part)."""
        found = int(self._sampled_slots(np.array([step]))[0])
        if found >= 0 or not claim:
            return found
        k, thinned = step // self.every, self._sampled_step.shape[0] - self.dense
        slot = k % self.dense
        if self._sampled_step[slot] < step:
            self._keep_thinned(slot)
        elif thinned and k % self.stride == 0:  # late for the dense part: perhaps kept as an older step
            slot = self.dense + (k // self.stride) % thinned
            if self._sampled_step[slot] > step:
                return -1
        else:
            return -1
        self._sampled_step[slot] = step
        self._writes += 1
        if self._updates is not None:
            self._updates[slot] = np.nan
        return slot

    def _keep_thinned(self, slot: int) -> None:
        """Move the step of dense ``slot``, about to be reused, into the thinned part if it is kept
        there (one in ``stride``) and newer than what its slot there holds."""
        step, thinned = int(self._sampled_step[slot]), self._sampled_step.shape[0] - self.dense
        if step < 0 or not thinned or (step // self.every) % self.stride:
            return
        older = self.dense + (step // self.every // self.stride) % thinned
        if self._sampled_step[older] >= step:
            return
        self._sampled_step[older] = step
        for ring in (self._scalars, self._present, self._order, self._updates):
            if ring is not None:
                ring[older] = ring[slot]

    def add_step(self, step: int, **values: float) -> None:
        """Record per-step values (names from ``STEP_FIELDS``) of ``step``."""
        slot = self._step_slot(step)
        if slot >= 0:
            for name, value in values.items():
                self._step_values[slot, STEP_FIELDS.index(name)] = value

    def add_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Record logged scalar metrics of ``step``."""
        slot = self._step_slot(step)
        if slot < 0:
            return
        for name, value in metrics.items():
            if name not in self._metrics:
                self._metrics[name] = np.full(self._step.shape[0], np.nan)
            self._metrics[name][slot] = value

    def mark_failed(self, step: int) -> None:
        slot = self._step_slot(step)
        if slot >= 0:
            self._failed[slot] = True

    def add_sampled(self, step: int, rows: np.ndarray, present: np.ndarray, order: np.ndarray) -> None:
        """Record a sampled step: float64 ``(R, ROW_WIDTH)`` rows (absent rows are ignored),
        bool ``(R,)`` presence and int ``(R,)`` backward order (-1 when unknown)."""
        slot = self._sampled_slot(step, claim=True)
        if slot < 0:
            return
        self._scalars[slot] = rows[:, : layout.HIST]
        self._present[slot] = present
        self._order[slot] = order
        known = present & layout.histogram_known(rows)
        if not known.any() or not self._hist_step.shape[0]:
            return
        hslot = self._hist_slot(step)
        if hslot < 0:
            hslot = self._hist_next
            self._hist_next = (hslot + 1) % self._hist_step.shape[0]
            self._hist_step[hslot] = step
            self._writes += 1
        self._hist[hslot] = np.where(known[:, None], np.nan_to_num(rows[:, layout.HIST :]), 0)
        self._hist_known[hslot] = known
        self._hist_max_abs[hslot] = rows[:, layout.MAX_ABS]

    def _hist_slot(self, step: int) -> int:
        """The histogram ring's slot holding ``step``, or -1."""
        found = np.flatnonzero(self._hist_step == step)
        return int(found[0]) if found.size else -1

    def add_updates(self, step: int, weight_sq: np.ndarray, update_sq: np.ndarray) -> None:
        """Record per-row squared weight and update norms of a sampled step."""
        if self._updates is None:
            return
        slot = self._sampled_slot(step, claim=False)
        if slot >= 0:
            self._updates[slot, :, 0] = weight_sq
            self._updates[slot, :, 1] = update_sq

    # ---- reading ------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of the rings, logged metrics included
        (:func:`gradscope.run.budget.history_bytes` without them)."""
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray)) + sum(
            a.nbytes for a in self._metrics.values()
        )

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(self._metrics)

    def fields(self) -> tuple[str, ...]:
        """Every name :meth:`series` accepts."""
        updates = UPDATE_FIELDS if self._updates is not None else ()
        return (*ROW_FIELDS, *OTHER_ROW_FIELDS, *updates, *STEP_FIELDS, *STEP_FLAGS, *self._metrics)

    def latest_sampled(self) -> int:
        """The newest sampled step recorded, or -1."""
        return int(self._sampled_step.max())

    def has_hist(self, step: int) -> bool:
        """Whether sampled ``step`` has histograms (of some rows) still kept."""
        return self._hist_slot(step) >= 0

    def sampled_rows(self, step: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows float64 ``(R, ROW_WIDTH)``, present ``(R,)``) of a kept sampled step; a row's
        histogram columns are NaN (:data:`gradscope.stats.layout.NO_HISTOGRAM`) where it had
        none at that step or it is no longer kept."""
        slot = self._sampled_slot(step, claim=False)
        if slot < 0:
            return None
        rows = np.full((len(self.row_names), layout.ROW_WIDTH), layout.NO_HISTOGRAM)
        rows[:, : layout.HIST] = self._scalars[slot]
        hslot = self._hist_slot(step)
        if hslot >= 0:
            known = self._hist_known[hslot]
            rows[known, layout.HIST :] = self._hist[hslot, known]
        return rows, self._present[slot].copy()

    def latest_histograms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's newest kept histogram: counts float64 ``(R, NUM_BINS)`` (NaN where a row
        has none), its step int64 ``(R,)`` (-1 where none) and the row's ``max_abs`` at that
        step float64 ``(R,)``."""
        rows = len(self.row_names)
        hist = np.full((rows, layout.NUM_BINS), np.nan)
        steps = np.full(rows, -1, dtype=np.int64)
        max_abs = np.full(rows, np.nan)
        order = self._ring_order(self._hist_step, None)
        if not order.size:
            return hist, steps, max_abs
        known = self._hist_known[order]
        newest = len(order) - 1 - np.argmax(known[::-1], axis=0)
        seen = known.any(axis=0)
        slots = order[newest[seen]]
        hist[seen] = self._hist[slots, np.flatnonzero(seen)]
        steps[seen] = self._hist_step[slots]
        max_abs[seen] = self._hist_max_abs[slots, np.flatnonzero(seen)]
        return hist, steps, max_abs

    def series(self, name: str, last: int | None = None) -> Series:
        """Values of ``name`` over the kept steps (see :class:`Series`); ``last`` keeps only
        that many of the newest."""
        if name in STEP_FIELDS or name in STEP_FLAGS or name in self._metrics:
            return self._step_series(name, last)
        if name == "hist":
            order = self._ring_order(self._hist_step, last)
            values = np.where(self._hist_known[order][..., None], self._hist[order], np.nan)
            return Series(name, values, self._hist_step[order], self.row_names)
        if name in formats.FP8_FIELDS:
            return self._fp8_series(name, last)
        if name not in ROW_FIELDS and name not in UPDATE_FIELDS and name != "backward_order":
            raise KeyError(f"unknown history field {name!r}; known: {', '.join(self.fields())}")
        if name in UPDATE_FIELDS and self._updates is None:
            raise KeyError(f"{name!r} needs watch(..., track_updates=True, optimizer=...)")
        order = self._ring_order(self._sampled_step, last)
        present = self._present[order]
        values = self._row_values(name, order)
        if name != "present":
            values = np.where(present, values, np.nan)
        return Series(name, values, self._sampled_step[order], self.row_names)

    def _ring_order(self, steps: np.ndarray, last: int | None) -> np.ndarray:
        """:func:`_ring_order`, remembered per ring until a step is written into it (a health
        judgement reads a dozen series of the same two rings)."""
        cached = self._orders.get(id(steps))
        if cached is None or cached[0] != self._writes:
            cached = (self._writes, _ring_order(steps))
            self._orders[id(steps)] = cached
        order = cached[1]
        return order if last is None else order[-last:]

    def _fp8_series(self, name: str, last: int | None) -> Series:
        """An FP8 readiness field (:data:`gradscope.stats.formats.FP8_FIELDS`) at the steps whose
        histograms are kept; NaN where a row had no histogram."""
        order = self._ring_order(self._hist_step, last)
        known = self._hist_known[order]
        max_abs = np.where(known, self._hist_max_abs[order], np.nan)
        values = formats.fp8_fields(self._hist[order].astype(np.float64), max_abs)[name]
        return Series(name, np.where(known, values, np.nan), self._hist_step[order], self.row_names)

    def _row_values(self, name: str, order: np.ndarray) -> np.ndarray:
        if name == "present":
            return self._present[order].copy()
        if name == "backward_order":
            return self._order[order].astype(np.float64)
        if name in UPDATE_FIELDS:
            return update_norms(self._updates[order, :, 0], self._updates[order, :, 1])[name]
        scalars = self._scalars[order]
        columns = {field: scalars[..., i] for i, field in enumerate(layout.SCALAR_FIELDS)}
        if name in columns:
            return columns[name].copy()
        return layout.derive(name, columns)

    def _step_series(self, name: str, last: int | None) -> Series:
        order = self._ring_order(self._step, last)
        steps = self._step[order]
        if name == "failed":
            return Series(name, self._failed[order].copy(), steps, None)
        if name == "skipped":
            return Series(name, self._skipped(order, steps), steps, None)
        if name in self._metrics:
            return Series(name, self._metrics[name][order].copy(), steps, None)
        return Series(name, self._step_values[order, STEP_FIELDS.index(name)].copy(), steps, None)

    def _skipped(self, order: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Steps a GradScaler skipped. It skips every step whose gradients hold NaN/Inf and
        then lowers its scale: a sampled step under a scaler with non-finite gradients is
        skipped (known at once, the run's last step included), and so is any step followed
        by a lower scale (unsampled steps too)."""
        scale = self._step_values[order, STEP_FIELDS.index("grad_scale")]
        skipped = np.zeros(len(order), dtype=bool)
        skipped[:-1] = (scale[1:] < scale[:-1]) & (steps[1:] == steps[:-1] + 1)
        slots = self._sampled_slots(steps)
        sampled = slots >= 0
        counts = self._scalars[np.maximum(slots, 0)][:, :, [layout.NANS, layout.INFS]]
        nonfinite = sampled & (np.nan_to_num(counts) > 0).any(axis=(1, 2))
        return skipped | (nonfinite & np.isfinite(scale))


def _ring_order(steps: np.ndarray, last: int | None = None) -> np.ndarray:
    """Slots of a ring holding steps (-1 = empty), oldest step first, the newest ``last`` only.

    Steps are written in increasing order, so the slots after the newest one, wrapping
    around, are the oldest: a rotation, checked, with a sort as the fallback.
    """
    if not (steps >= 0).any():
        return np.zeros(0, dtype=np.intp)
    newest = int(np.argmax(steps))
    order = (newest + 1 + np.arange(steps.shape[0])) % steps.shape[0]
    order = order[steps[order] >= 0]
    if np.any(np.diff(steps[order]) <= 0):
        order = np.argsort(steps, kind="stable")
        order = order[steps[order] >= 0]
    return order if last is None else order[-last:]
