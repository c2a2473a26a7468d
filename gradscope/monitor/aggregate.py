"""Per-parameter rows into the rows a monitor reports (layers): pure functions, no model.

The monitor measures one statistics row per watched parameter. A reported row (a layer, or
a parameter with ``granularity="parameter"``) combines the rows of its parameters that had
a gradient in the step, by the row's declared rule (:func:`gradscope.stats.layout.combine_segments`);
its backward order is that of its first parameter to become final, and in distributed runs
the rank a non-finite gradient came from is the lowest among its parameters'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradscope.stats import layout

_NONE = np.iinfo(np.int64).max  # "no value" inside a minimum


@dataclass(frozen=True)
class LayerRows:
    """A sampled step's reported rows (``R`` of them).

    Attributes:
        rows: float64 ``(R, ROW_WIDTH)`` statistics rows (zeros where absent).
        present: bool ``(R,)``, whether any parameter of the row had a gradient.
        order: int64 ``(R,)``, backward order of the row (0 = final first), -1 when unknown.
        nonfinite_rank: int64 ``(R,)`` or None: distributed runs, the lowest rank whose
            gradient of the row held NaN/Inf (-1: none or unknown).
        nonfinite_ranks: int64 ``(R,)`` or None: how many ranks' gradients did — the most
            any one parameter of the row saw (a lower bound when its parameters went
            non-finite on different ranks).
    """

    rows: np.ndarray
    present: np.ndarray
    order: np.ndarray
    nonfinite_rank: np.ndarray | None = None
    nonfinite_ranks: np.ndarray | None = None


class RowGroups:
    """Which parameters make up each reported row.

    Args:
        row_of: int ``(P,)``, the reported row of each parameter; every row in
            ``0 .. row_of.max()`` has at least one parameter.
    """

    def __init__(self, row_of: np.ndarray) -> None:
        row_of = np.asarray(row_of, dtype=np.int64)
        self.row_of = row_of
        self._perm = np.argsort(row_of, kind="stable")
        self._starts = np.flatnonzero(np.r_[True, np.diff(row_of[self._perm]) != 0]) if len(row_of) else row_of
        if len(self._starts) != (row_of.max() + 1 if len(row_of) else 0):
            raise ValueError("every reported row needs at least one parameter")

    @property
    def rows(self) -> int:
        return len(self._starts)

    def sum(self, per_param: np.ndarray) -> np.ndarray:
        """Per-parameter values (``(P, ...)``) added up per row (``(R, ...)``)."""
        return np.add.reduceat(np.asarray(per_param)[self._perm], self._starts, axis=0)

    def _minimum(self, values: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Per row, the least of ``values`` where ``where`` holds (-1 when nowhere)."""
        least = np.minimum.reduceat(np.where(where, values, _NONE)[self._perm], self._starts)
        least[least == _NONE] = -1
        return least

    def combine(
        self,
        param_rows: np.ndarray,
        present: np.ndarray,
        order: np.ndarray,
        nonfinite_rank: np.ndarray | None = None,
        nonfinite_ranks: np.ndarray | None = None,
    ) -> LayerRows:
        """The reported rows of one sampled step.

        Args:
            param_rows: float64 ``(P, ROW_WIDTH)``, a row per parameter (absent ones ignored).
            present: bool ``(P,)``, which parameters had a gradient.
            order: int ``(P,)``, backward order per parameter (-1 unknown).
            nonfinite_rank, nonfinite_ranks: int ``(P,)`` per parameter (sharded runs), or None.
        """
        kept = np.where(present[:, None], param_rows, 0.0)
        rows = layout.combine_segments(kept[self._perm], self._starts)
        row_present = np.logical_or.reduceat(present[self._perm], self._starts)
        row_order = self._minimum(order, present & (order >= 0))
        rank = ranks = None
        if nonfinite_rank is not None:
            rank = self._minimum(nonfinite_rank, present & (nonfinite_rank >= 0))
            ranks = np.maximum.reduceat(np.where(present, nonfinite_ranks, 0)[self._perm], self._starts)
        return LayerRows(rows, row_present, row_order, rank, ranks)


def blame_replicas(layer: LayerRows, culprits: Sequence[int]) -> LayerRows:
    """DDP: every row whose averaged gradient holds NaN/Inf, blamed on the ranks whose own
    gradient did before averaging (``culprits``, from gradscope's communication hook)."""
    bad = layer.present & (layer.rows[:, layout.NANS] + layer.rows[:, layout.INFS] > 0)
    rank = np.where(bad, min(culprits) if culprits else -1, -1)
    ranks = np.where(bad, len(culprits), 0)
    return LayerRows(layer.rows, layer.present, layer.order, rank, ranks)
