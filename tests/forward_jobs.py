"""What each rank runs in the distributed forward-statistics test (spawned by :mod:`multiprocess`).

A DDP or FSDP2 (``fully_shard``) model watched with ``forward=True`` under a real gloo group. Each rank measures its own
activations and the ranks combine their rows, so every rank's rows are checked here against
the float64 reference of the *global* batch: every rank's batch and the module outputs it
gives, recomputed in this process with an unwatched copy of the model (DDP keeps the weights
equal and no optimizer step changes them). Plain data goes back to the test.
"""

from __future__ import annotations

import torch
from forward_reference import ROOT, assert_row, reference
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import gradscope

ROWS_PER_RANK = 4


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def rank_batch(rank: int, step: int, nan: bool) -> torch.Tensor:
    x = torch.randn(ROWS_PER_RANK, 6, generator=torch.Generator().manual_seed(1000 * rank + step))
    if nan:
        x[0, 0] = float("nan")
    return x


def ddp_forward_job(rank: int, world: int, root, nan_rank: int, nan_step: int, wrapper: str = "ddp") -> dict:
    """Three steps of DDP (or FSDP2: ``wrapper="fsdp2"``) with ``forward=True``; a NaN in
    ``nan_rank``'s batch at ``nan_step``."""
    model, unwatched = _net(), _net()
    outputs: dict[str, list] = {}
    for name, module in unwatched.named_modules():
        module.register_forward_hook(lambda m, a, out, name=name or ROOT: outputs[name].append(out.detach()))
    if wrapper == "ddp":
        ddp = DDP(model)
    else:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        ddp = fully_shard(model, mesh=mesh)  # the LayerNorm stays in the root group

    def hooks() -> dict:  # FSDP2 has hooks of its own: compare with what was there before watch()
        return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}

    before = hooks()
    mon = gradscope.watch(ddp, forward=True, backend="numpy")
    for step in range(3):
        x = rank_batch(rank, step, rank == nan_rank and step == nan_step)
        ddp(x).square().mean().backward()
        mon.step()
        ddp.zero_grad()
        mon.history("forward_present")  # waits for this step's rows
        record = mon._run.forward.latest
        assert record.step == step
        everyone = [rank_batch(r, step, r == nan_rank and step == nan_step) for r in range(world)]
        outputs.clear()
        outputs.update({name or ROOT: [] for name, _ in unwatched.named_modules()})
        with torch.no_grad():
            for batch in everyone:
                unwatched(batch)
        assert_row(record.inputs[0], reference(everyone), f"rank {rank} step {step}: the global batch")
        for i, name in enumerate(mon.info.modules):
            assert_row(record.outputs[i], reference(outputs[name]), f"rank {rank} step {step}: {name}")
        assert not record.present[0, 1:].any(), "no module but the root is fed by unmeasured code"
    events = [(e.step, mon.info.modules[e.module], e.where, e.nans, e.rank) for e in mon._run.forward.events]
    report = mon.report(wait=True)
    mon.close()
    hooked = [name for name, count in hooks().items() if count != before[name]]
    return {
        "modules": mon.info.modules,
        "events": events,
        "nonfinite_rank": mon._run.forward.latest.nonfinite_rank.tolist(),
        "findings": report.to_dict()["findings"],
        "errors": list(mon.errors),
        "hooked_after_close": hooked,
    }


def in_flight_job(rank: int, world: int, root) -> dict:
    """DDP with ``forward=True``: at step 1 rank 1 reaches ``mon.step()`` a second late, so rank
    0's combining all-reduce of that step's forward rows cannot finish meanwhile; rank 0's
    report at once names the step as in flight, and ``report(wait=True)`` has its numbers."""
    import time

    ddp = DDP(_net())
    mon = gradscope.watch(ddp, forward=True, backend="numpy")
    notes = {}
    for step in range(2):
        ddp(rank_batch(rank, step, False)).square().mean().backward()
        if rank == 1 and step == 1:
            time.sleep(1.5)
        mon.step()
        ddp.zero_grad()
    if rank == 0:
        notes["in_flight"] = mon._in_flight()
        notes["early"] = mon.report().note
        notes["forward_steps_early"] = mon._run.forward.steps().tolist()
    waited = mon.report(wait=True)
    notes["late"] = waited.note
    notes["forward_steps_late"] = mon._run.forward.steps().tolist()
    mon.close()
    return notes
