"""Training a real model under ``gradscope.watch`` for the tests of what the report says."""

from __future__ import annotations

import gradscope


def train(model, opt, steps, loss_at, **watch_options):
    """Train ``model`` for ``steps`` steps under ``gradscope.watch``; ``loss_at(step)`` computes a
    step's loss. Returns the report and the losses the loop saw (floats)."""
    losses = []
    with gradscope.watch(model, **watch_options) as mon:
        for step in range(steps):
            loss = loss_at(step)
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return mon.report(), losses
