"""Forward statistics of a run: a bounded history of module outputs, and where NaN/Inf was born.

Fed by :class:`gradscope.run.records.Forward` records (``watch(..., forward=True)``). Kept:

* per sampled step and module, the scalar columns of its outputs (``FORWARD_HISTORY`` steps,
  allocated up front: ``(modules * 64 + 8) * FORWARD_HISTORY`` bytes);
* the newest record whole (outputs, inputs, histograms, dtypes), for the format checks;
* the first :data:`KEPT_EVENTS` steps whose forward pass held NaN/Inf, each with its origin
  (:class:`ForwardNonfinite`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradscope.run import records
from gradscope.stats import layout

FORWARD_HISTORY = 256
"""Sampled steps whose per-module forward scalars are kept (the newest)."""

KEPT_EVENTS = 32
"""Forward steps with NaN/Inf remembered for the whole run."""

FORWARD_FIELDS = tuple(
    f"forward_{name}" for name in (*layout.SCALAR_FIELDS, *layout.DERIVED_FIELDS, "present", "order")
)
"""History fields of module outputs: ``forward_<column or derived value>``, ``forward_present``
and ``forward_order`` (position of the module returning in the step's forward sequence)."""


@dataclass(frozen=True)
class ForwardNonfinite:
    """A sampled step whose forward pass held NaN/Inf, and where it was born.

    Attributes:
        step: the sampled step.
        module: index (into ``RunInfo.modules``) of the origin: the first module, in the forward
            sequence, whose outputs (``where="outputs"``) — or whose inputs that no module
            produced (``where="inputs"``: the batch at the root, or the parent's own code) —
            held NaN/Inf.
        where: ``"outputs"`` or ``"inputs"``.
        nans, infs: NaN and Inf values in that origin's tensors.
        dtype: dtype of the origin module's output ("" when unknown).
        modules: indices of every module whose outputs held NaN/Inf, in forward order.
        rank: distributed runs: the lowest rank whose origin tensors held NaN/Inf (-1: unknown).
    """

    step: int
    module: int
    where: str
    nans: int
    infs: int
    dtype: str
    modules: tuple[int, ...]
    rank: int = -1


def nonfinite_origin(record: records.Forward) -> ForwardNonfinite | None:
    """Where NaN/Inf first appears in a forward record (None when it was finite).

    Infinities are legitimate sentinels in forward (``-inf`` attention masks, ``+inf``
    padding distances), so a pass counts as non-finite only when some tensor held NaN or the
    model's own output (the root module, row 0) held NaN/Inf; and inputs holding only Inf
    (masks passed in) are never the origin. The origin is then the first remaining row in
    forward order."""
    both = np.stack([record.inputs, record.outputs])  # (2, M, ROW_WIDTH)
    nans = record.present & (both[..., layout.NANS] > 0)
    bad = record.present & (both[..., layout.NANS] + both[..., layout.INFS] > 0)
    if not (nans.any() or bad[1, 0]):
        return None
    bad[0] &= nans[0]  # inputs holding only Inf: masks, not the origin
    if not bad.any():
        return None
    kind, module = np.unravel_index(np.argmin(np.where(bad, record.order, np.iinfo(np.int64).max)), bad.shape)
    outputs_bad = np.flatnonzero(bad[1])
    following = outputs_bad[np.argsort(record.order[1, outputs_bad], kind="stable")]
    row = both[kind, module]
    return ForwardNonfinite(
        step=int(record.step),
        module=int(module),
        where="inputs" if kind == 0 else "outputs",
        nans=int(row[layout.NANS]),
        infs=int(row[layout.INFS]),
        dtype=record.dtypes[module] if module < len(record.dtypes) else "",
        modules=tuple(int(m) for m in following),
        rank=int(record.nonfinite_rank[kind, module]) if record.nonfinite_rank is not None else -1,
    )


class ForwardHistory:
    """Forward statistics of a run (module docstring).

    Args:
        modules: module names (``RunInfo.modules``).
        capacity: sampled steps kept.
    """

    def __init__(self, modules: tuple[str, ...], capacity: int = FORWARD_HISTORY) -> None:
        self.modules = modules
        count = len(modules)
        self._step = np.full(capacity, -1, dtype=np.int64)
        self._scalars = np.zeros((capacity, count, layout.HIST))
        self._order = np.full((capacity, count), -1, dtype=np.int64)
        self.latest: records.Forward | None = None
        self.events: list[ForwardNonfinite] = []
        self.nonfinite_steps = 0
        self._next = 0

    def add(self, record: records.Forward) -> None:
        """Keep one forward record (records arrive in step order)."""
        slot = self._next % len(self._step)
        self._next += 1
        self._step[slot] = record.step
        self._scalars[slot] = record.outputs[:, : layout.HIST]
        self._order[slot] = record.order[1]
        if self.latest is None or record.step >= self.latest.step:
            self.latest = record
        event = nonfinite_origin(record)
        if event is not None:
            self.nonfinite_steps += 1
            if len(self.events) < KEPT_EVENTS:
                self.events.append(event)

    def steps(self) -> np.ndarray:
        """Kept sampled steps, oldest first."""
        kept = self._step >= 0
        order = np.argsort(self._step[kept], kind="stable")
        return self._step[kept][order]

    def sampled(self, step: int) -> bool:
        """Whether forward statistics of ``step`` are kept."""
        return bool((self._step == step).any())

    def series(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        """``(values (S, M), steps (S,))`` of a :data:`FORWARD_FIELDS` field, oldest first;
        NaN where a module did not run."""
        if field not in FORWARD_FIELDS:
            raise KeyError(field)
        name = field.removeprefix("forward_")
        kept = np.flatnonzero(self._step >= 0)
        kept = kept[np.argsort(self._step[kept], kind="stable")]
        order = self._order[kept]
        present = order >= 0
        if name == "present":
            return present.astype(np.float64), self._step[kept]
        if name == "order":
            values = order.astype(np.float64)
        else:
            scalars = self._scalars[kept]
            columns = {column: scalars[..., i] for i, column in enumerate(layout.SCALAR_FIELDS)}
            values = np.asarray(layout.derive(name, columns), dtype=np.float64)
        return np.where(present, values, np.nan), self._step[kept]
