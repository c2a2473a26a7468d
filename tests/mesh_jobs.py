"""What each rank runs in the device-mesh tests (spawned by :mod:`multiprocess`): FSDP2 and
tensor parallel on one 2-D ``(dp, tp)`` mesh, the usual setup in which the norm and the output
layer are not in the tensor-parallel plan (sharded over ``mesh["dp"]`` only)."""

from __future__ import annotations

import copy

import torch
from distributed_jobs import ROWS_PER_RANK, batch
from stats_reference import reference_layers
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import gradscope

STEPS = 4


class Net(nn.Module):
    """Even widths (tensor parallel splits 8 features over 2 ranks), otherwise as in
    :class:`distributed_jobs.Net`: inp, hidden, then a LayerNorm and the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.hidden = nn.Linear(8, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.norm(self.hidden(torch.relu(self.inp(x)))))


def _reference_rows(reference: Net, step: int, dp: int) -> tuple[dict, float]:
    """Per-layer reference rows and the total norm of the unsharded model's gradient on the
    step's global batch, computed in float64."""
    reference.zero_grad()
    x, y = batch(step, dp)
    nn.functional.mse_loss(reference(x.double()), y.double()).backward()
    grads = {name: p.grad for name, p in reference.named_parameters()}
    total = float(torch.sqrt(sum((g * g).sum() for g in grads.values())))
    return reference_layers(grads, {name: name.rpartition(".")[0] for name in grads}), total


def fsdp_tp_job(rank: int, world: int, root, mode: str, layout: str = "fsdp_tp") -> dict:
    """One ``watch(model)`` on a 2-D mesh. ``"fsdp_tp"``: inp and hidden tensor parallel and
    FSDP2 on the ``(dp, tp)`` mesh, norm and out FSDP2 on its ``dp`` submesh only (replicated
    over ``tp``). ``"hsdp"``: every layer FSDP2 on a ``(replicate, shard)`` mesh. Every row and
    the total norm must equal the unsharded model's (float64) within 1e-5 relative."""
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model).double()
    if layout == "fsdp_tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"inp": ColwiseParallel(), "hidden": RowwiseParallel()})
        for layer in (model.inp, model.hidden, model.out):
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])  # the LayerNorm: on the dp submesh, replicated over tp
        dp, dp_rank = 2, mesh["dp"].get_local_rank()  # both tp ranks of a dp group see the same batch
    else:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        for layer in (model.inp, model.hidden, model.out):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        dp, dp_rank = world, rank
    mon = gradscope.watch(model, mode=mode, backend="numpy")
    totals, worst = [], 0.0
    for step in range(STEPS):
        x, y = batch(step, dp, dp_rank)
        assert x.shape[0] == ROWS_PER_RANK
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.step(loss=loss)
        model.zero_grad()
        mon.report(wait=True)  # the step's rows are on the host
        expected, expected_total = _reference_rows(reference, step, dp)
        stats = mon.stats(step)
        assert tuple(stats.names) == ("inp", "hidden", "norm", "out"), stats.names
        for r, name in enumerate(stats.names):
            ref = expected[name]
            for field in ("numel", "zeros", "nans", "infs"):
                assert getattr(stats, field)[r] == ref[field], (name, field, getattr(stats, field)[r], ref[field])
            for field in ("sumsq", "max_abs"):
                relative = abs(getattr(stats, field)[r] - ref[field]) / ref[field]
                worst = max(worst, relative)
                assert relative <= 1e-5, (name, field, getattr(stats, field)[r], ref[field])
        totals.append((stats.total_norm, expected_total))
        assert abs(stats.total_norm - expected_total) <= 1e-5 * expected_total, totals[-1]
    report = mon.report(wait=True)
    mon.close()
    return {
        "report": report.to_dict(),
        "norm": mon.history("norm").values,
        "totals": totals,
        "worst": worst,
        "topology": mon.topology.to_dict(),
        "errors": list(mon.errors),
    }
