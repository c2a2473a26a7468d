"""What each rank runs in the pipeline-parallel tests (spawned by :mod:`multiprocess`).

A small float64 model (``Net``) is split into two ``torch.distributed.pipelining`` stages,
either by hand (``nn.Sequential`` of the model's blocks, which renumbers them: its rows need
``watch(names=model)``) or by ``pipeline()`` (whose stage modules keep the model's names), and
trained for a few steps by a real schedule over a gloo group; optionally each stage is also
sharded by FSDP2 over a second, data-parallel dimension of ranks (torchtitan's layout; DDP
inside a stage fails in torch 2.13's own bucket rebuilding, with or without gradscope). The
test compares what gradscope reports with the same model trained unsplit in one process
(:func:`reference_run`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline

import gradscope

BATCH = 8
"""Examples per optimisation step (per data-parallel replica)."""
STEPS = 3
LR = 0.05
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
FIELDS = ("norm", "max_abs", "zeros", "numel", "present")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return torch.relu(self.norm(self.fc(x)))


class Net(nn.Module):
    """``emb``, four blocks (``layers.0`` .. ``layers.3``: ``fc``, ``norm``), ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(6, 8)
        self.layers = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.emb(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def model() -> Net:
    torch.manual_seed(0)
    return Net().double()


def batch(step: int, replicas: int = 1, replica: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch (``BATCH`` rows per replica), or one replica's part. Input
    feature 0 is always 0, so column 0 of ``emb.weight``'s gradient is exactly zero."""
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(replicas * BATCH, 6, generator=generator, dtype=torch.float64)
    x[:, 0] = 0.0
    y = torch.randn(replicas * BATCH, 3, generator=generator, dtype=torch.float64)
    if replica is None:
        return x, y
    part = slice(replica * BATCH, (replica + 1) * BATCH)
    return x[part], y[part]


def reference_run(replicas: int = 1) -> tuple[list[dict[str, torch.Tensor]], list[float], dict[str, str]]:
    """The unsplit model trained in this process on the global batches, in float64: each step's
    gradients by parameter name, each step's loss, and each parameter's row (its module)."""
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    grads, losses = [], []
    for step in range(STEPS):
        x, y = batch(step, replicas)
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in net.named_parameters()})
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return grads, losses, {name: name.rpartition(".")[0] for name, _ in net.named_parameters()}


def _by_hand(net: Net, stage: int) -> nn.Module:
    """Stage ``stage``'s module cut by hand: its blocks renumbered from 0 (rows '0', '1.fc'...)."""
    if stage == 0:
        return nn.Sequential(net.emb, net.layers[0], net.layers[1])
    return nn.Sequential(net.layers[2], net.layers[3], net.head)


def _meshes(replicas: int):
    """This rank's pipeline group and data-parallel mesh (None, None without data
    parallelism); rank ``r`` holds stage ``r % 2`` of pipeline ``r // 2``."""
    if replicas == 1:
        return None, None
    mesh = init_device_mesh("cpu", (replicas, 2), mesh_dim_names=("dp", "pp"))
    return mesh["pp"].get_group(), mesh["dp"]


def pipeline_job(rank: int, world: int, root, schedule: str, split: str, microbatches: int, log_rank) -> dict:
    """Train ``Net`` in 2 stages (``world // 2`` data-parallel replicas of each) with
    ``schedule``, watched with ``watch(stage, ...)``; return what the test checks."""
    replicas = world // 2
    pipeline_group, replica_mesh = _meshes(replicas)
    index, replica = rank % 2, rank // 2
    net = model()
    result: dict = {}
    if split == "by_hand":
        module = _by_hand(net, index)
        try:  # names collide ('1.fc' in both stages): refused, naming the fix, on every rank
            gradscope.watch(PipelineStage(module, index, 2, torch.device("cpu"), group=pipeline_group))
        except ValueError as error:
            result["collision"] = str(error)
        names = {"names": net}
    else:
        x, _ = batch(0)
        split_spec = {"layers.2": SplitPoint.BEGINNING}
        pipe = pipeline(net, mb_args=(x[: BATCH // microbatches],), split_spec=split_spec)
        module = pipe.get_stage_module(index)
        names = {}
    if replica_mesh is not None:
        fully_shard(module, mesh=replica_mesh)
    stage = PipelineStage(module, index, 2, torch.device("cpu"), group=pipeline_group)
    runner = SCHEDULES[schedule](stage, n_microbatches=microbatches, loss_fn=nn.functional.mse_loss)
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    result["refused"] = []
    for args, options in (((), {"mode": "backward"}), ((1, "backward"), {}), ((), {"accumulation_steps": 2})):
        try:  # refused before any collective: no rank waits
            gradscope.watch(stage, *args, **options, **names)
        except ValueError as error:
            result["refused"].append(str(error))
    mon = gradscope.watch(stage, log_dir=root / "log", log_rank=log_rank, **names)
    losses = []
    for step in range(STEPS):
        x, y = batch(step, replicas, replica)
        if index == 0:
            runner.step(x)
            mon.step()
        else:
            microbatch_losses: list = []
            runner.step(target=y, losses=microbatch_losses)
            loss = torch.stack(microbatch_losses).mean().detach()  # equal microbatches: the batch's mean loss
            losses.append(float(loss))
            mon.step(loss=loss)
        optimizer.step()
        optimizer.zero_grad()
    result.update(
        rows=mon.rows,
        mode=mon.mode,
        topology=mon.topology.kind,
        place=mon.pipeline.to_dict(),
        logs=mon.is_logging_rank,
        errors=list(mon.errors),
        series={field: mon.history(field) for field in FIELDS},
        losses=losses,
        report_layers=[layer["name"] for layer in mon.report(wait=True).to_dict()["layers"]],
    )
    mon.close()
    return result
