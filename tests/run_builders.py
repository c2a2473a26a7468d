"""Runs built by hand for tests: a ``RunInfo`` with the usual defaults, the ``RunState`` fed by it,
a few steps of training a real model under ``gradscope.watch`` ending in its report, and a few
embedding lookups under ``gradscope.watch``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

import gradscope
from gradscope import Thresholds
from gradscope.health.report import HealthReport
from gradscope.monitor.monitor import Monitor
from gradscope.run.info import RunInfo
from gradscope.run.state import RunState


def run_info(
    rows: Sequence[str],
    *,
    numel: int | Sequence[int],
    row_types: Sequence[str] | None = None,
    summary: dict | None = None,
    every: int = 1,
    history: int = 200,
    hist_history: int = 200,
    track_updates: bool = False,
    extra: dict | None = None,
) -> RunInfo:
    """A layer-granularity, backward-mode ``RunInfo`` over ``rows``.

    Args:
        rows: the row names.
        numel: elements per row: one number for every row, or one per row.
        row_types: the owning modules' class names (default ``"Linear"`` for every row).
        summary: the model summary (default empty).
        every, history, hist_history, track_updates: as in ``RunInfo``.
        extra: ``RunInfo.extra`` (default empty).
    """
    rows = tuple(rows)
    return RunInfo(
        rows=rows,
        row_types=tuple(row_types or ("Linear",) * len(rows)),
        summary={} if summary is None else summary,
        every=every,
        mode="backward",
        granularity="layer",
        history=history,
        hist_history=hist_history,
        track_updates=track_updates,
        row_numel=(numel,) * len(rows) if isinstance(numel, int) else tuple(numel),
        extra={} if extra is None else extra,
    )


def run_state(rows: Sequence[str], **info_options) -> RunState:
    """An empty ``RunState`` for ``run_info(rows, **info_options)``."""
    return RunState(run_info(rows, **info_options))


def train_and_report(
    model: torch.nn.Module,
    steps: int,
    input_shape: tuple[int, ...],
    *,
    thresholds: Thresholds | None = None,
    **watch_options,
) -> HealthReport:
    """Train ``model`` for ``steps`` steps under ``gradscope.watch(model, **watch_options)`` and
    return its report.

    Each step's input is ``torch.randn(*input_shape)`` from a generator seeded with 0, and its
    loss the mean square of the output, passed to ``mon.step``. With an ``optimizer`` among
    ``watch_options`` the step ends with ``optimizer.step()`` and ``optimizer.zero_grad()``,
    without one with ``model.zero_grad()``. The report is taken inside the ``watch`` block, with
    ``thresholds`` (default ``Thresholds(sustain=2)``).
    """
    optimizer = watch_options.get("optimizer")
    g = torch.Generator().manual_seed(0)
    with gradscope.watch(model, **watch_options) as mon:
        for _ in range(steps):
            loss = model(torch.randn(*input_shape, generator=g)).square().mean()
            loss.backward()
            mon.step(loss=loss)
            if optimizer is None:
                model.zero_grad()
            else:
                optimizer.step()
                optimizer.zero_grad()
        return mon.report(thresholds=Thresholds(sustain=2) if thresholds is None else thresholds)


@contextmanager
def watched_lookups(model: torch.nn.Module, steps: int, vocab: int, *, zero_grad: bool = True) -> Iterator[Monitor]:
    """Run ``steps`` backward passes of ``model`` (an embedding first) under ``gradscope.watch(model)``
    and yield the monitor, still watching.

    Each step looks up a 2x2 batch of token ids from ``torch.randint(0, vocab, ...)`` (the global
    generator), back-propagates the sum of the output and calls ``mon.step()`` without a loss;
    with ``zero_grad`` it then calls ``model.zero_grad()``, without it gradients accumulate.
    """
    with gradscope.watch(model) as mon:
        for _ in range(steps):
            model(torch.randint(0, vocab, (2, 2))).sum().backward()
            mon.step()
            if zero_grad:
                model.zero_grad()
        yield mon
