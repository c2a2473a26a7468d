"""How a watched model is spread over ranks: its topology, found once when ``watch()`` is called.

Three layouts:

* ``"single"``: no process group, or a model that is neither DDP nor sharded; every rank
  measures its own gradients.
* ``"replicated"``: a ``DistributedDataParallel`` model. After DDP's all-reduce every rank
  holds the same (averaged) gradient, so each rank measures it whole and no collective is
  needed for the statistics (:mod:`gradscope.distributed.replicas` adds the optional
  per-rank checks).
* ``"sharded"``: parameters that are DTensors (FSDP2's ``fully_shard``, tensor parallel,
  HSDP), on one device mesh or on submeshes of it (FSDP2 x TP on a ``(dp, tp)`` mesh, with a
  norm on ``mesh["dp"]``). Each rank measures its local shard with the same kernels, and
  :class:`gradscope.distributed.sharded.ShardedRows` combines the rows over the ranks of
  the widest of those meshes, each part of a parameter counted once (:func:`first_holders`).

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
        ValueError: DTensor parameters on meshes neither of which holds the other, parameters
            with ``Partial`` placements, or a DDP model whose parameters are DTensors.
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
    for i in sharded:
        if any(p.is_partial() for p in params[i].placements):
            raise ValueError(f"watch: parameter '{names[i]}' has a Partial placement {params[i].placements}")
    group = _combining_group(params, names, sharded)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    contributes = first_holders(params, group)
    return Topology("sharded", group, rank, world, global_rank=global_rank, contributes=contributes)


def _ranks(mesh) -> tuple[int, ...]:
    return tuple(sorted(int(r) for r in mesh.mesh.flatten().tolist()))


def _combining_group(params, names, sharded: list[int]):
    """The process group over which the rows are combined: the ranks of the widest mesh a
    watched parameter is on, which must hold every other parameter's mesh (a ``(dp, tp)``
    mesh holds its ``dp`` submeshes). Not the root mesh: a ``(pp, dp)`` root holds other
    pipeline stages, whose parameters are not this model's. None: the default group."""
    meshes = [params[i].device_mesh for i in sharded]
    widest = max(range(len(meshes)), key=lambda k: meshes[k].size())
    ranks = _ranks(meshes[widest])
    for k, i in enumerate(sharded):
        if not set(_ranks(meshes[k])) <= set(ranks):
            raise ValueError(
                f"watch: parameters '{names[sharded[widest]]}' and '{names[i]}' are on device meshes over ranks "
                f"{list(ranks)} and {list(_ranks(meshes[k]))}, neither of which holds the other, so no one set of "
                "ranks holds the whole model; watch the submodule on each mesh with its own monitor (e.g. "
                "gradscope.watch(model.encoder) and gradscope.watch(model.decoder))"
            )
    if len(ranks) == dist.get_world_size():
        return None
    if meshes[widest].ndim == 1:
        return meshes[widest].get_group()
    return dist.new_group(list(ranks), use_local_synchronization=True)


def shard_key(tensor: torch.Tensor) -> tuple:
    """Which part of a parameter this rank holds: for each mesh dimension the parameter is
    sharded along, ``(mesh dim, coordinate, mesh size)``; empty for a replicated or plain
    tensor. Ranks whose keys are equal hold equal values (replicas), wherever their meshes are:
    a parameter kept on ``mesh["dp"]`` of a ``(dp, tp)`` mesh has the same key on every tp rank."""
    if not _is_dtensor(tensor):
        return ()
    mesh, coordinate = tensor.device_mesh, tensor.device_mesh.get_coordinate()
    return tuple(  # every placement but Replicate splits the tensor (Shard, FSDP2's _StridedShard under TP)
        (d, int(coordinate[d]), int(mesh.size(d)))
        for d, placement in enumerate(tensor.placements)
        if not placement.is_replicate()
    )


def first_holders(params, group) -> np.ndarray:
    """bool ``(P,)``: whether this rank is the lowest rank of ``group`` holding its part of each
    parameter, so that every part enters the combined sums exactly once (replicas of a
    replicated mesh dimension, of a submesh's sibling, or of a plain tensor are counted once).
    One ``all_gather_object`` of every rank's shard keys (:func:`shard_key`), when ``watch`` is called."""
    keys = [shard_key(p) for p in params]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, keys, group=group)
    rank = dist.get_rank(group)
    contributes = np.zeros(len(params), dtype=bool)
    for i, key in enumerate(keys):
        contributes[i] = next(r for r, theirs in enumerate(gathered) if theirs[i] == key) == rank
    return contributes
