"""What each rank runs in the distributed Lightning tests (spawned by :mod:`multiprocess`).

Each job builds a real ``lightning.pytorch.Trainer`` inside a rank of an existing gloo process
group (``run_ranks`` creates it; Lightning sees the group and does not create one, and sees
``LOCAL_RANK`` in the environment and launches no processes), fits a small
:class:`LitNet` with :class:`gradscope.integrations.lightning.GradscopeCallback`, and returns
plain data: gradscope's histories and what the module itself saw at every optimizer step
(the weights, the batches and the averaged or sharded gradients), from which the test computes
an independent float64 reference.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from distributed_jobs import Net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradscope
from gradscope.integrations.lightning import GradscopeCallback

FIELDS = ("numel", "norm", "max_abs", "zeros", "nans", "present")
PER_RANK = 4
"""Rows in one micro-batch of one rank."""
DEAD_UNIT = 0
"""Unit of ``inp`` whose ReLU never fires (its bias is very negative): exact zeros in the
gradients of ``inp.weight[0]``, ``inp.bias[0]`` and ``hidden.weight[:, 0]`` at every step."""


class Body(Net):
    """:class:`distributed_jobs.Net` (uneven layers: 5 output rows of 'hidden' shard unevenly
    over 2 ranks) with one dead unit (:data:`DEAD_UNIT`)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.inp.bias[DEAD_UNIT] = -100.0


class LitNet(pl.LightningModule):
    """:class:`Body` trained with SGD on a mean-squared error; records, at every optimizer step,
    the full weights and gradients the optimizer is about to use (``on_before_optimizer_step``
    runs after the callbacks' and before gradient clipping) and the batches of the step.

    Args:
        fsdp: apply FSDP2 ``fully_shard`` in ``configure_model`` (ModelParallelStrategy).
        nan_at: ``(rank, global_step)``: that rank's first input of that step is NaN.
    """

    def __init__(self, fsdp: bool = False, nan_at: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.net = Body()
        self.fsdp, self.nan_at = fsdp, nan_at
        self.steps: list[dict] = []
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._clip_pending = False

    def configure_model(self) -> None:
        if not self.fsdp:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net.inp, self.net.hidden, self.net.out):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)  # the root group: the LayerNorm's parameters

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.nan_at == (self.global_rank, self.trainer.global_step):
            x = x.clone()
            x[0, 0] = float("nan")
        self._batches.append((x.detach().clone(), y.detach().clone()))
        return nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.steps.append(
            {
                "global_step": self.trainer.global_step,
                "weights": {name: _full(p) for name, p in self.named_parameters()},
                "grads": {name: _full(p.grad) for name, p in self.named_parameters()},
                "batches": self._batches,
            }
        )
        self._batches = []
        self._clip_pending = True

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._clip_pending:  # the step's gradients after clipping (SGD leaves them as they are)
            self._clip_pending = False
            grads = [_full(p.grad).double() for p in self.parameters()]
            self.steps[-1]["clipped_norm"] = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of a tensor or of the whole of a DTensor."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)


def dataset(samples: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(samples, 6, generator=generator), torch.randn(samples, 3, generator=generator))


def _as_launched_externally(rank: int, world: int, port: int) -> None:
    """The environment of a process someone else launched (Lightning's LightningEnvironment:
    ``LOCAL_RANK`` set means "do not launch processes")."""
    os.environ.update(
        LOCAL_RANK=str(rank),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _trainer(root, strategy, world: int, callback, **options) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=world,
        num_nodes=1,
        strategy=strategy,
        callbacks=[callback],
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **options,
    )


def _result(trainer: pl.Trainer, callback, module: LitNet) -> dict:
    mon = callback.monitor
    series = {field: mon.history(field) for field in FIELDS}
    return {
        "rows": list(series["norm"].rows),
        "steps": series["norm"].steps.tolist(),
        "series": {field: s.values for field, s in series.items()},
        "topology": mon.topology.to_dict(),
        "step_index": mon.step_index,
        "global_step": trainer.global_step,
        "stop_reason": callback.stop_reason,
        "errors": list(mon.errors),
        "recorded": module.steps,
        "param_names": [name for name, _ in module.named_parameters()],
    }


def _ddp_fit(rank: int, world: int, root, steps: int, accumulate: int, clip: float) -> dict:
    """``Trainer.fit`` under ``DDPStrategy`` (gloo): each rank its shard of the data
    (Lightning's DistributedSampler), ``accumulate`` micro-batches per step, clipping to
    ``clip``; gradscope writes its run log where it does by default (rank 0 only)."""
    from lightning.pytorch.strategies import DDPStrategy

    torch.manual_seed(0)
    module = LitNet()
    callback = GradscopeCallback(report=False)
    trainer = _trainer(
        root / "ddp",
        DDPStrategy(process_group_backend="gloo"),
        world,
        callback,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
    )
    data = DataLoader(dataset(steps * accumulate * world * PER_RANK), batch_size=PER_RANK)
    trainer.fit(module, data)
    result = _result(trainer, callback, module)
    result["run_dir"] = str(callback.session.run_dir)
    result["writes_log"] = callback.monitor.is_logging_rank
    return result


def _fsdp_fit(rank: int, world: int, root, steps: int) -> dict:
    """``Trainer.fit`` under ``ModelParallelStrategy``: FSDP2 over a 'data_parallel' mesh of
    all ranks (gloo on CPU), so that each rank also gets its own shard of the data."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.manual_seed(0)
    module = LitNet(fsdp=True)
    callback = GradscopeCallback(log_dir=None, report=False)
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, process_group_backend="gloo")
    trainer = _trainer(root / "fsdp", strategy, world, callback, max_steps=steps)
    data = DataLoader(dataset(steps * world * PER_RANK, seed=1), batch_size=PER_RANK)
    trainer.fit(module, data)
    result = _result(trainer, callback, module)
    result["sharded_params"] = [name for name, p in module.named_parameters() if hasattr(p, "full_tensor")]
    return result


def measure_job(rank: int, world: int, root, port: int, ddp: tuple, fsdp: tuple) -> dict:
    """Two fits in the same ranks, one after the other (one spawn: starting a rank and
    importing Lightning costs far more than these fits): ``_ddp_fit(*ddp)``, ``_fsdp_fit(*fsdp)``."""
    _as_launched_externally(rank, world, port)
    return {"ddp": _ddp_fit(rank, world, root, *ddp), "fsdp": _fsdp_fit(rank, world, root, *fsdp)}


def halt_job(rank: int, world: int, root, port: int, steps: int, nan_at: tuple[int, int]) -> dict:
    """``halt_on="nonfinite"`` under DDP with a NaN in one rank's batch at one step; the result
    also says at which step ``fit`` raised ``TrainingHalted`` (``halted_at``; None if not)."""
    from lightning.pytorch.strategies import DDPStrategy

    _as_launched_externally(rank, world, port)
    torch.manual_seed(0)
    module = LitNet(nan_at=nan_at)
    callback = GradscopeCallback(log_dir=None, report=False, halt_on="nonfinite")
    trainer = _trainer(root / "halt", DDPStrategy(process_group_backend="gloo"), world, callback, max_steps=steps)
    data = DataLoader(dataset(steps * world * PER_RANK, seed=2), batch_size=PER_RANK)
    halted_at = None
    try:
        trainer.fit(module, data)
    except gradscope.TrainingHalted as halted:  # raised before that step's optimizer.step()
        halted_at = halted.step
    result = _result(trainer, callback, module)
    result.pop("recorded")
    result["halted_at"] = halted_at
    return result
