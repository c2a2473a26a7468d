"""Training a real model under ``gradscope.watch`` for the tests of what the report says."""

from __future__ import annotations

import gradscope


def train_monitored(model, opt, steps, loss_at, **watch_options):
    """Train ``model`` for ``steps`` steps under ``gradscope.watch``; ``loss_at(step)`` computes a
    step's loss. Returns the monitor (open: its statistics are all on the host, CPU) and the
    losses the loop saw (floats); the caller closes it."""
    losses = []
    mon = gradscope.watch(model, **watch_options)
    try:
        for step in range(steps):
            loss = loss_at(step)
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    except BaseException:
        mon.close()
        raise
    return mon, losses


def train(model, opt, steps, loss_at, **watch_options):
    """:func:`train_monitored`, closed; returns the report (read before closing) and the losses."""
    mon, losses = train_monitored(model, opt, steps, loss_at, **watch_options)
    with mon:
        return mon.report(), losses
