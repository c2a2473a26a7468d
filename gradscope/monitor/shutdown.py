"""``shut_down``: how a monitor ends what it started, by ``close()`` or by its finalizer."""

from __future__ import annotations

from gradscope.monitor import hooks
from gradscope.monitor.engines import Engines
from gradscope.monitor.schedule import OpenStep
from gradscope.outputs.pump import RecordPump


def shut_down(
    handles: list, forward, engines: Engines, pump: RecordPump | None, open_step: OpenStep, optimizer_parts=()
) -> None:
    """End what a monitor started: its hooks (on the model, and the optimizer hooks of
    ``optimizer_parts``: the update tracker, the weight reader, the learning-rate controller),
    its capture workers and its pump, which delivers what is queued, writes the closing record
    (the steps done: the open step's number) and closes every exporter (the run log's file).
    Run once, by ``close()`` or, for a monitor dropped without it, by its finalizer."""
    hooks.release(handles, forward)
    for part in optimizer_parts:
        part.close()
    engines.close()
    if pump is not None:
        pump.close(open_step.index)
