"""What each rank runs in the distributed tests of acting on findings (spawned by :mod:`multiprocess`).

Each job trains a real DDP model under gloo and returns, per step, what this rank's monitor
decided, so the test can check that every rank acted at the same step.
"""

from __future__ import annotations

import warnings

import torch
from distributed_jobs import ROWS_PER_RANK, Net, batch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradscope


def halting_job(rank: int, world: int, root, nan_rank: int, nan_step: int) -> dict:
    """A NaN in one rank's batch at ``nan_step`` (DDP averages it into every rank's gradient):
    every rank must raise TrainingHalted at the same step, with the same finding."""
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    halted = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = gradscope.watch(ddp, optimizer=opt, halt_on="nonfinite")
        for step in range(20):
            x, y = batch(step, world, rank, nan=rank == nan_rank and step == nan_step)
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            try:
                mon.step(loss=loss.detach())
            except gradscope.TrainingHalted as halt:
                halted = {"step": step, "kind": halt.finding.kind, "layer": halt.finding.layer}
                break
            opt.step()
            opt.zero_grad()
        errors = list(mon.errors)
        mon.close()
    return {"halted": halted, "errors": errors}


def controller_job(rank: int, world: int, root, spike_rank: int, spike_step: int, steps: int) -> dict:
    """Each rank reports its own loss; only ``spike_rank``'s spikes at ``spike_step`` (as a
    rank-local loss spike does), and only rank 0 logs a worsening validation loss. Every rank
    must change its learning rate and turn ``should_stop`` at the same step, and the replicas'
    weights must stay identical."""
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scales, stops = [], []
    adapt = gradscope.AdaptiveLR(on=("loss_spike",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = gradscope.watch(ddp, optimizer=opt, adapt_lr=adapt, early_stopping=gradscope.EarlyStopping(patience=2))
        for step in range(steps):
            x, y = batch(step, world, rank)
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            reported = 1.0 + 0.01 * (step % 3)
            if rank == spike_rank and step == spike_step:
                reported = 100.0
            mon.step(loss=reported)
            opt.step()
            opt.zero_grad()
            if step % 5 == 4:
                mon.log(val_loss=float(step) if rank == 0 else -float(step))  # rank 0's worsens
            scales.append(mon.lr_scale)
            stops.append(mon.should_stop)
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        actions = [a["message"] for a in mon.report().actions]
        errors = list(mon.errors)
        mon.close()
    return {"scales": scales, "stops": stops, "weights": weights.tolist(), "actions": actions, "errors": errors}


__all__ = ["ROWS_PER_RANK", "controller_job", "halting_job"]
