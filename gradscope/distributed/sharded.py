"""Sharded gradients (FSDP2, DTensor): combining each rank's rows into the whole gradient's.

Each rank measures its local shard of every watched parameter; :class:`ShardedRows`
combines the per-parameter rows across the mesh with two asynchronous all-reduces on one
flat buffer, following the row's declared combine rule (:data:`gradscope.stats.layout.COMBINE`):
the columns that add in one ``SUM`` all-reduce, those that take the maximum in one ``MAX``
all-reduce. Combined rows equal those of the unsharded gradient: counts, ``max_abs`` and
histograms exactly, sums up to summation order. A light row's unknown (NaN) histogram stays
unknown after combining unless every shard that contributes computed it.

Wire format of one sampled step (``P`` watched parameters, float64; ``S = len(SUM_COLUMNS)``,
``M = len(MAX_COLUMNS)``)::

    [ P x S summed columns | P non-finite flags (sum) | P x M maximised columns | P rank codes (max) ]

The flag counts the ranks whose shard of a parameter holds NaN/Inf (NaN on every entry when
a rank could not measure the step: the step is void everywhere); the rank code is
``world - rank`` on such ranks (0 elsewhere), so its maximum names the lowest such rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradscope.distributed.collectives import all_reduce_sum_max
from gradscope.distributed.topology import Topology
from gradscope.stats import layout

SUM_WIDTH = len(layout.SUM_COLUMNS) + 1
"""float64 values per parameter in the summed part of the wire buffer."""

MAX_WIDTH = len(layout.MAX_COLUMNS) + 1
"""float64 values per parameter in the maximised part of the wire buffer."""


def wire_bytes(params: int) -> int:
    """Bytes all-reduced per sampled step for ``params`` sharded parameters (both collectives)."""
    return 8 * params * (SUM_WIDTH + MAX_WIDTH)


@dataclass
class CombinedRows:
    """Rows of one sampled step after combining across ranks.

    Attributes:
        rows: float64 ``(P, ROW_WIDTH)``, as if each parameter were unsharded.
        nonfinite_rank: int ``(P,)``, the lowest rank whose part held NaN/Inf (-1: none).
        nonfinite_ranks: int ``(P,)``, how many ranks' parts held NaN/Inf.
    """

    rows: np.ndarray
    nonfinite_rank: np.ndarray
    nonfinite_ranks: np.ndarray


class ShardedRows:
    """Combines per-parameter rows of sharded gradients across ranks (module docstring).

    Args:
        topology: a ``"sharded"`` topology.
        members: indices (into the watched parameters) of the rows this combiner gets.
        device: where the rows live (CUDA: the collectives run on the device, ordered on
            the current stream; CPU: gloo, waited for when the host reads the step).
    """

    def __init__(self, topology: Topology, members: np.ndarray, device: torch.device) -> None:
        self.group = topology.group
        self.rank = topology.rank
        self.world = topology.world
        self.count = len(members)
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self._contributes = torch.tensor(topology.contributes[members], dtype=torch.bool, device=self.device)
        self._sum_columns = torch.as_tensor(layout.SUM_COLUMNS, device=self.device)
        self._max_columns = torch.as_tensor(layout.MAX_COLUMNS, device=self.device)

    @property
    def numel(self) -> int:
        """float64 values in one wire buffer."""
        return self.count * (SUM_WIDTH + MAX_WIDTH)

    def issue(self, rows: torch.Tensor, failed: bool = False) -> tuple[torch.Tensor, list]:
        """Start combining ``rows`` (float64 ``(P, ROW_WIDTH)`` on ``device``); returns the wire
        buffer and the collectives' work handles. Never synchronises the host on CUDA.

        ``failed``: this rank could not measure the step; it still takes part (every rank
        must issue the same collectives) with its flags NaN, which voids the step everywhere.
        """
        count = self.count
        wire = torch.empty(self.numel, dtype=torch.float64, device=self.device)
        summed = wire[: count * SUM_WIDTH].view(count, SUM_WIDTH)
        maxed = wire[count * SUM_WIDTH :].view(count, MAX_WIDTH)
        if failed:
            summed.zero_()
            summed[:, -1] = float("nan")  # poisons the step on every rank
            maxed.zero_()
        else:
            bad = ((rows[:, layout.NANS] + rows[:, layout.INFS]) > 0) & self._contributes
            # Replicas of a parameter that is not sharded add once: only the first contributes
            # (a select, not a product: a light row's NaN histogram times 0 would still be NaN).
            summed[:, :-1] = torch.where(self._contributes[:, None], rows.index_select(1, self._sum_columns), 0.0)
            summed[:, -1] = bad
            maxed[:, :-1] = rows.index_select(1, self._max_columns)
            maxed[:, -1] = bad * float(self.world - self.rank)
        return wire, all_reduce_sum_max(wire, count * SUM_WIDTH, self.group)

    def decode(self, wire: np.ndarray) -> CombinedRows | None:
        """Combined rows from a reduced wire buffer (host, float64); None when a rank failed."""
        count = self.count
        summed = wire[: count * SUM_WIDTH].reshape(count, SUM_WIDTH)
        maxed = wire[count * SUM_WIDTH :].reshape(count, MAX_WIDTH)
        if count and np.isnan(summed[:, -1]).any():
            return None
        rows = np.empty((count, layout.ROW_WIDTH))
        rows[:, layout.SUM_COLUMNS] = summed[:, :-1]
        rows[:, layout.MAX_COLUMNS] = maxed[:, :-1]
        code = maxed[:, -1]
        first = np.where(code > 0, self.world - code, -1).astype(np.int64)
        return CombinedRows(rows, first, summed[:, -1].astype(np.int64))
