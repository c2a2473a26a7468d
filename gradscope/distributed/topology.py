"""How a watched model is spread over ranks: its topology, found once when ``watch()`` is called.

Three layouts:

* ``"single"``: no process group, or a model that is neither DDP nor sharded; every rank
  measures its own gradients.
* ``"replicated"``: a ``DistributedDataParallel`` model. After DDP's all-reduce every rank
  holds the same (averaged) gradient, so each rank measures it whole and no collective is
  needed for the statistics (:mod:`gradscope.distributed.replicas` adds the optional
  per-rank checks).
* ``"sharded"``: parameters that are DTensors (FSDP2's ``fully_shard``, tensor parallel).
  Each rank measures its local shard with the same kernels, and
  :class:`gradscope.distributed.sharded.ShardedRows` combines the rows across the mesh.

Also here: seeing through the wrappers a model may come in (``torch.compile``, DDP).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``torch.compile`` and ``DistributedDataParallel`` wrappers (the
    model itself otherwise), so that rows are named as in the user's model."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, torch.nn.Module):
        return unwrap(inner)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return unwrap(model.module)
    return model


def find_ddp(model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapper around (or inside a compile wrapper of) ``model``."""
    while isinstance(model, torch.nn.Module):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model
        model = getattr(model, "_orig_mod", None)
    return None


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
