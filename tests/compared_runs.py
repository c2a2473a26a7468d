"""Real runs to compare: a small MLP trained for a few steps under ``gradscope.watch`` with a log.

Every run starts from the same seed and sees the same batches, so two runs with the same
arguments are identical bit for bit on the CPU; ``nudge_from`` multiplies one module's output
by ``1 + nudge`` from that step on (a forward hook registered before ``watch``'s, so the
statistics see the nudged output), the smallest change a refactor or a new kernel makes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import gradscope

STEPS = 8
MODEL_LAYERS = ("0", "2", "4")
"""The MLP's layers with parameters, in forward order: Linear, ReLU, Linear, ReLU, Linear."""


def mlp(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))


def logged_run(
    directory: Path,
    *,
    seed: int = 0,
    lr: float = 0.05,
    steps: int = STEPS,
    nudge_module: str | None = None,
    nudge_from: int = 5,
    nudge: float = 1e-3,
    val_shift: float = 0.0,
    model: nn.Module | None = None,
    **watch_options,
) -> Path:
    """Train for ``steps`` steps, logging to ``directory``; ``mon.step(loss, train_accuracy=...)`` every
    step and ``mon.log(val_loss=..., val_accuracy=...)`` every other step (``val_shift`` added to
    the validation loss: a fold that generalises worse). Returns ``directory``."""
    torch.manual_seed(seed)
    model = mlp() if model is None else model
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    step = {"now": 0}
    if nudge_module is not None:
        target = dict(model.named_modules())[nudge_module]

        def scale(module, args, output):
            return output * (1 + nudge) if step["now"] >= nudge_from else output

        target.register_forward_hook(scale)
    data = torch.Generator().manual_seed(1234)
    x, y = torch.randn(64, 6, generator=data), torch.randint(0, 3, (64,), generator=data)
    xv, yv = torch.randn(32, 6, generator=data), torch.randint(0, 3, (32,), generator=data)
    with gradscope.watch(model, log_dir=directory, **watch_options) as mon:
        for i in range(steps):
            step["now"] = i
            batch = slice((8 * i) % 64, (8 * i) % 64 + 8)
            out = model(x[batch])
            loss = nn.functional.cross_entropy(out, y[batch])
            loss.backward()
            train_acc = (out.argmax(1) == y[batch]).float().mean()
            mon.step(loss, train_accuracy=train_acc)
            opt.step()
            opt.zero_grad()
            if i % 2 == 1:
                with torch.no_grad():
                    val = model(xv)
                    val_loss = nn.functional.cross_entropy(val, yv).item() + val_shift
                    val_acc = (val.argmax(1) == yv).float().mean().item()
                mon.log(val_loss=val_loss, val_accuracy=val_acc)
    return directory
