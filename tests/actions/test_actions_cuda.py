"""Acting on findings on a GPU: no host synchronisation added to ``mon.step()`` by callbacks,
early stopping or the learning-rate controller; with ``halt_on`` a NaN halts at its own step
(``mon.step()`` waits for a sampled step's statistics then), before its optimizer update."""

from __future__ import annotations

import pytest
import torch
from models import make

import gradscope

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def every_action(opt, **extra):
    """Every action that needs no host sync (halting on a NaN does: it is tested below)."""
    return {
        "optimizer": opt,
        "on_finding": lambda finding: None,
        "halt_on": "divergence",  # judged on the time budget, never waited for
        "early_stopping": gradscope.EarlyStopping(patience=3),
        "adapt_lr": gradscope.AdaptiveLR(),
        **extra,
    }


def test_acting_adds_no_host_sync_to_mon_step():
    model = make("transformer").cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 5, 32, device="cuda")
    y = torch.randint(0, 4, (8,), device="cuda")
    with gradscope.watch(model, **every_action(opt)) as mon:
        mon._responder.cadence.budget = 1e9  # judge at every step: the most the loop can pay
        for _ in range(3):  # compile kernels, allocate buffers
            torch.nn.functional.cross_entropy(model(x), y).backward()
            mon.step(loss=torch.tensor(1.0, device="cuda"))
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        judged = mon._responder.judgements
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(6):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                mon.step(loss=loss.detach())
                opt.step()
                opt.zero_grad()
                mon.log(val_loss=1.0 + step)  # a Python float: logging reads nothing from the device
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert mon._responder.judgements >= judged + 5
        assert mon.errors == []


@pytest.mark.parametrize("halt_on", ["nonfinite", "critical"])
def test_a_nan_halts_at_its_own_step_on_cuda_and_never_reaches_the_weights(halt_on):
    model = make("mlp").cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt, halt_on=halt_on) as mon:
        halted_at = None
        for step in range(30):
            x = torch.randn(16, 16, device="cuda")
            if step == 20:
                x[0, 0] = float("nan")
            loss = model(x).pow(2).mean()
            loss.backward()
            try:
                mon.step(loss=loss.detach())
            except gradscope.TrainingHalted as halt:
                halted_at = step
                assert halt.finding.kind == "nonfinite"
                break
            opt.step()
            opt.zero_grad()
    assert halted_at == 20
    assert all(torch.isfinite(p).all() for p in model.parameters())
