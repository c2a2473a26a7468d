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

    [ P x S summed columns | failed (sum) | P x M maximised columns ]

``failed`` is NaN from a rank that could not measure the step, which voids the step on
every rank (0 otherwise).

**The rank a NaN/Inf came from is not known here.** Under FSDP2 each rank's own (unsharded)
gradient is reduce-scattered — summed into every rank's shard — before gradscope sees the
shard, so a NaN in one rank's batch reaches every rank's shard of every parameter it
touches: the ranks whose shard holds NaN/Inf tell where it *landed* (which rows of the
parameter they own), not whose batch or backward pass it came from. :class:`CombinedRows`
therefore names no rank; per-rank forward statistics (``watch(forward=True)``,
:mod:`gradscope.distributed.rank_rows`) do, for a NaN/Inf born in a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradscope.distributed.collectives import all_reduce_sum_max
from gradscope.distributed.topology import Topology
from gradscope.stats import layout

SUM_WIDTH = len(layout.SUM_COLUMNS)
"""float64 values per parameter in the summed part of the wire buffer."""

MAX_WIDTH = len(layout.MAX_COLUMNS)
"""float64 values per parameter in the maximised part of the wire buffer."""


def wire_numel(params: int) -> int:
    """float64 values all-reduced per sampled step for ``params`` sharded parameters."""
    return params * (SUM_WIDTH + MAX_WIDTH) + 1


def wire_bytes(params: int) -> int:
    """Bytes all-reduced per sampled step for ``params`` sharded parameters (both collectives)."""
    return 8 * wire_numel(params)


@dataclass
class CombinedRows:
    """Rows of one sampled step after combining across ranks.

    Attributes:
        rows: float64 ``(P, ROW_WIDTH)``, as if each parameter were unsharded.
        nonfinite_rank: int64 ``(P,)``, the rank a NaN/Inf came from: -1 (unknown) for every
            parameter, since a shard holding NaN/Inf says where it landed, not where it came
            from (module docstring).
        nonfinite_ranks: int64 ``(P,)``, how many ranks it came from: 0 (unknown).
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
        self.count = len(members)
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self._contributes = torch.tensor(topology.contributes[members], dtype=torch.bool, device=self.device)
        self._sum_columns = torch.as_tensor(layout.SUM_COLUMNS, device=self.device)
        self._max_columns = torch.as_tensor(layout.MAX_COLUMNS, device=self.device)

    @property
    def numel(self) -> int:
        """float64 values in one wire buffer."""
        return wire_numel(self.count)

    def issue(self, rows: torch.Tensor, failed: bool = False) -> tuple[torch.Tensor, list]:
        """Start combining ``rows`` (float64 ``(P, ROW_WIDTH)`` on ``device``); returns the wire
        buffer and the collectives' work handles. Never synchronises the host on CUDA.

        ``failed``: this rank could not measure the step; it still takes part (every rank
        must issue the same collectives) with ``failed`` NaN, which voids the step everywhere.
        """
        count = self.count
        split = count * SUM_WIDTH + 1
        wire = torch.empty(self.numel, dtype=torch.float64, device=self.device)
        summed = wire[: count * SUM_WIDTH].view(count, SUM_WIDTH)
        maxed = wire[split:].view(count, MAX_WIDTH)
        if failed:
            summed.zero_()
            maxed.zero_()
            wire[split - 1] = float("nan")  # voids the step on every rank
        else:
            # Replicas of a parameter that is not sharded add once: only the first contributes
            # (a select, not a product: a light row's NaN histogram times 0 would still be NaN).
            summed.copy_(torch.where(self._contributes[:, None], rows.index_select(1, self._sum_columns), 0.0))
            maxed.copy_(rows.index_select(1, self._max_columns))
            wire[split - 1] = 0.0
        return wire, all_reduce_sum_max(wire, split, self.group)

    def decode(self, wire: np.ndarray) -> CombinedRows | None:
        """Combined rows from a reduced wire buffer (host, float64); None when a rank failed."""
        count = self.count
        split = count * SUM_WIDTH + 1
        if np.isnan(wire[split - 1]):
            return None
        rows = np.empty((count, layout.ROW_WIDTH))
        rows[:, layout.SUM_COLUMNS] = wire[: split - 1].reshape(count, SUM_WIDTH)
        rows[:, layout.MAX_COLUMNS] = wire[split:].reshape(count, MAX_WIDTH)
        return CombinedRows(rows, np.full(count, -1, dtype=np.int64), np.zeros(count, dtype=np.int64))
