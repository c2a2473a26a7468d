"""Distributed training: how a watched model is spread over ranks, and combining its rows.

Three layouts, found by :func:`topology` when ``watch()`` is called:

* ``"single"``: no process group, or a model that is neither DDP nor sharded; every rank
  measures its own gradients.
* ``"replicated"``: a ``DistributedDataParallel`` model. After DDP's all-reduce every rank
  holds the same (averaged) gradient, so each rank measures it whole and no collective is
  needed for the statistics (:mod:`gradscope.replicas` adds the optional per-rank checks).
* ``"sharded"``: parameters that are DTensors (FSDP2's ``fully_shard``, tensor parallel).
  Each rank measures its local shard with the same kernels, and :class:`ShardedRows`
  combines the per-parameter rows across the mesh with two asynchronous all-reduces on one
  flat buffer: a sum (counts, sums, histograms) and a max (``max_abs``). Combined rows equal
  those of the unsharded gradient: counts and histograms exactly, sums up to summation order.

Wire format of one sampled step (``P`` watched parameters, float64)::

    [ P x ROW_WIDTH rows (sum) | P non-finite flags (sum) | P max_abs (max) | P rank codes (max) ]

The flag counts the ranks whose shard of a parameter holds NaN/Inf; the rank code is
``world - rank`` on such ranks (0 elsewhere), so its maximum names the lowest such rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from gradscope import layout
from gradscope.watched import find_ddp

KINDS = ("single", "replicated", "sharded")

SUM_WIDTH = layout.ROW_WIDTH + 1
"""float64 values per parameter in the summed part of the wire buffer."""

MAX_WIDTH = 2
"""float64 values per parameter in the maximised part of the wire buffer."""


def wire_bytes(params: int) -> int:
    """Bytes all-reduced per sampled step for ``params`` sharded parameters (both collectives)."""
    return 8 * params * (SUM_WIDTH + MAX_WIDTH)


@dataclass(frozen=True)
class Topology:
    """How a watched model is spread over ranks.

    Attributes:
        kind: ``"single"``, ``"replicated"`` (DDP) or ``"sharded"`` (DTensor parameters).
        group: the process group gradscope's collectives use (None: the default group, or
            no collectives at all for ``"single"``).
        rank: this process's rank in ``group``.
        world: the size of ``group`` (1 for ``"single"`` without a process group).
        global_rank: this process's rank in the default group (0 without one).
        contributes: bool ``(P,)``, sharded only: whether this rank's row of each watched
            parameter enters the sum (False for replicas of a replicated parameter, which
            are counted once, from the first replica).
    """

    kind: str
    group: object = None
    rank: int = 0
    world: int = 1
    global_rank: int = 0
    contributes: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "world": self.world, "rank": self.rank, "global_rank": self.global_rank}


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local part of a DTensor gradient (the tensor itself otherwise).

    Raises:
        ValueError: a DTensor with a ``Partial`` placement (its values are unreduced
            partial sums, whose statistics mean nothing).
    """
    if not _is_dtensor(tensor):
        return tensor
    if any(p.is_partial() for p in tensor.placements):
        raise ValueError(
            f"gradscope: a gradient has placements {tensor.placements} with Partial: it is not reduced yet, "
            "so its statistics would be meaningless"
        )
    return tensor.to_local()


def topology(model: torch.nn.Module, params: tuple[torch.Tensor, ...], names: tuple[str, ...]) -> Topology:
    """The layout of ``model`` (see the module docstring).

    Raises:
        ValueError: DTensor parameters on different device meshes, parameters with
            ``Partial`` placements, or a DDP model whose parameters are DTensors.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return Topology("single")
    global_rank = dist.get_rank()
    sharded = [i for i, p in enumerate(params) if _is_dtensor(p)]
    ddp = find_ddp(model)
    if ddp is not None:
        if sharded:
            raise ValueError(f"watch: DDP over DTensor parameters ('{names[sharded[0]]}') is not supported")
        group = ddp.process_group
        return Topology("replicated", group, dist.get_rank(group), dist.get_world_size(group), global_rank=global_rank)
    if not sharded:
        return Topology("single", None, global_rank, dist.get_world_size(), global_rank=global_rank)
    mesh = params[sharded[0]].device_mesh
    for i in sharded:
        if params[i].device_mesh != mesh:
            raise ValueError(
                f"watch: parameters '{names[sharded[0]]}' and '{names[i]}' are sharded over different device "
                "meshes; watch each part of the model separately (params=...)"
            )
    for i in sharded:
        if any(p.is_partial() for p in params[i].placements):
            raise ValueError(f"watch: parameter '{names[i]}' has a Partial placement {params[i].placements}")
    if mesh.ndim == 1:
        group = mesh.get_group()
    elif mesh.size() == dist.get_world_size():
        group = None
    else:
        ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
        group = dist.new_group(ranks, use_local_synchronization=True)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    coordinate = mesh.get_coordinate()
    contributes = np.zeros(len(params), dtype=bool)
    for i, p in enumerate(params):
        if _is_dtensor(p):
            # Count a replicated mesh dimension once: only its first replica contributes.
            contributes[i] = all(
                coordinate[dim] == 0 for dim, placement in enumerate(p.placements) if placement.is_replicate()
            )
        else:
            contributes[i] = rank == 0  # a plain tensor in a sharded model: taken to be replicated
    return Topology("sharded", group, rank, world, global_rank=global_rank, contributes=contributes)


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

    @property
    def numel(self) -> int:
        """float64 values in one wire buffer."""
        return self.count * (SUM_WIDTH + MAX_WIDTH)

    def issue(self, rows: torch.Tensor, failed: bool = False) -> tuple[torch.Tensor, list]:
        """Start combining ``rows`` (float64 ``(P, ROW_WIDTH)`` on ``device``); returns the wire
        buffer and the collectives' work handles. Never synchronises the host on CUDA.

        ``failed``: this rank could not measure the step; it still takes part (every rank
        must issue the same collectives) with rows marked unusable (NaN numel).
        """
        count = self.count
        wire = torch.empty(self.numel, dtype=torch.float64, device=self.device)
        summed = wire[: count * SUM_WIDTH].view(count, SUM_WIDTH)
        maxed = wire[count * SUM_WIDTH :].view(count, MAX_WIDTH)
        if failed:
            summed.zero_()
            summed[:, layout.NUMEL] = float("nan")  # poisons the step on every rank
            maxed.zero_()
        else:
            bad = ((rows[:, layout.NANS] + rows[:, layout.INFS]) > 0) & self._contributes
            torch.mul(rows, self._contributes[:, None], out=summed[:, : layout.ROW_WIDTH])
            summed[:, layout.ROW_WIDTH] = bad
            maxed[:, 0] = rows[:, layout.MAX_ABS]
            maxed[:, 1] = bad * float(self.world - self.rank)
        works = [
            dist.all_reduce(wire[: count * SUM_WIDTH], dist.ReduceOp.SUM, group=self.group, async_op=True),
            dist.all_reduce(wire[count * SUM_WIDTH :], dist.ReduceOp.MAX, group=self.group, async_op=True),
        ]
        if self.device.type == "cuda":
            for work in works:
                work.wait()  # the current stream waits for the collective; the host does not
            works = []
        return wire, works

    def decode(self, wire: np.ndarray) -> CombinedRows | None:
        """Combined rows from a reduced wire buffer (host, float64); None when a rank failed."""
        count = self.count
        summed = wire[: count * SUM_WIDTH].reshape(count, SUM_WIDTH)
        maxed = wire[count * SUM_WIDTH :].reshape(count, MAX_WIDTH)
        if count and np.isnan(summed[:, layout.NUMEL]).any():
            return None
        rows = summed[:, : layout.ROW_WIDTH].copy()
        rows[:, layout.MAX_ABS] = maxed[:, 0]
        code = maxed[:, 1]
        first = np.where(code > 0, self.world - code, -1).astype(np.int64)
        return CombinedRows(rows, first, summed[:, layout.ROW_WIDTH].astype(np.int64))


def works_done(works: list) -> bool:
    """Whether every collective in ``works`` has completed (without waiting)."""
    return all(work.is_completed() for work in works)


def wait_all(works: list) -> None:
    for work in works:
        work.wait()
