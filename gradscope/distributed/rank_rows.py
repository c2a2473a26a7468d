"""Rows that every rank measures on its own data, combined across the ranks of a process group.

Activations differ from rank to rank (each sees its own batch), so forward statistics are
combined like the rows of a sharded gradient: counts, sums and histograms add and
``max_abs`` takes the maximum (:data:`gradscope.stats.layout.COMBINE`), giving every rank the
statistics of the whole global batch. Two more facts travel with them: the lowest rank
whose row held NaN/Inf, and the earliest position (in the forward sequence) at which any
rank's row first held NaN/Inf — so the origin of a NaN that one rank produced is found on
every rank.

Wire format (``N`` rows, float64; ``S = len(SUM_COLUMNS)``, ``M = len(MAX_COLUMNS)``), two
asynchronous all-reduces::

    SUM: [ N x S summed columns | N non-finite flags ]
    MAX: [ N x M maximised columns | N rank codes | N position codes ]

The rank code is ``world - rank`` where the row held NaN/Inf (so the maximum names the
lowest rank), the position code ``LATEST - position`` (so the maximum names the earliest).
A rank that could not measure the step sends NaN flags, which void the step on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from gradscope.distributed.collectives import all_reduce_sum_max
from gradscope.stats import layout

LATEST = float(2**40)
"""Larger than any position in a forward sequence."""


@dataclass
class RankCombined:
    """Rows of one step combined over the ranks.

    Attributes:
        rows: float64 ``(N, ROW_WIDTH)``.
        first_bad: int64 ``(N,)``, earliest position at which a rank's row held NaN/Inf (-1: none).
        nonfinite_rank: int64 ``(N,)``, the lowest rank whose row held NaN/Inf (-1: none).
    """

    rows: np.ndarray
    first_bad: np.ndarray
    nonfinite_rank: np.ndarray


class RankRows:
    """Combines ``count`` rows across a process group (module docstring).

    Args:
        group: the process group (None: the default group).
        count: rows per step.
        device: where the rows live (CUDA: the collectives are ordered on the current stream
            and the host never waits; CPU: gloo, waited for when the host reads the step).
    """

    def __init__(self, group, count: int, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.count = count
        self.device = device
        self._sum = torch.as_tensor(layout.SUM_COLUMNS, device=device)
        self._max = torch.as_tensor(layout.MAX_COLUMNS, device=device)
        self._sum_width = len(layout.SUM_COLUMNS) + 1
        self._max_width = len(layout.MAX_COLUMNS) + 2

    def issue(self, rows: torch.Tensor, first_bad: torch.Tensor, failed: bool = False) -> tuple[torch.Tensor, list]:
        """Start combining ``rows`` (float64 ``(count, ROW_WIDTH)``) and ``first_bad`` (float64
        ``(count,)``, -1 where the row stayed finite), both on ``device``; returns the wire
        buffer and the work handles. Every rank must call it at every step it combines."""
        count = self.count
        wire = torch.zeros(count * (self._sum_width + self._max_width), dtype=torch.float64, device=self.device)
        summed = wire[: count * self._sum_width].view(count, self._sum_width)
        maxed = wire[count * self._sum_width :].view(count, self._max_width)
        if failed:
            summed[:, -1] = float("nan")  # voids the step on every rank
        else:
            bad = (rows[:, layout.NANS] + rows[:, layout.INFS]) > 0
            summed[:, :-1] = rows.index_select(1, self._sum)
            summed[:, -1] = bad
            maxed[:, :-2] = rows.index_select(1, self._max)
            maxed[:, -2] = bad * float(self.world - self.rank)
            maxed[:, -1] = torch.where(first_bad >= 0, LATEST - first_bad, torch.zeros_like(first_bad))
        return wire, all_reduce_sum_max(wire, count * self._sum_width, self.group)

    def decode(self, wire: np.ndarray) -> RankCombined | None:
        """Combined rows from a reduced wire buffer (host, float64); None when a rank failed."""
        count = self.count
        summed = wire[: count * self._sum_width].reshape(count, self._sum_width)
        maxed = wire[count * self._sum_width :].reshape(count, self._max_width)
        if count and np.isnan(summed[:, -1]).any():
            return None
        rows = np.empty((count, layout.ROW_WIDTH))
        rows[:, layout.SUM_COLUMNS] = summed[:, :-1]
        rows[:, layout.MAX_COLUMNS] = maxed[:, :-2]
        code = maxed[:, -2]
        rank = np.where(code > 0, self.world - code, -1).astype(np.int64)
        position = np.where(maxed[:, -1] > 0, LATEST - maxed[:, -1], -1).astype(np.int64)
        return RankCombined(rows, position, rank)
