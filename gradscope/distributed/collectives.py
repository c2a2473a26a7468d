"""Waiting on asynchronous collectives without blocking the training thread needlessly."""

from __future__ import annotations

import torch
import torch.distributed as dist


def works_done(works: list) -> bool:
    """Whether every collective in ``works`` has completed (without waiting)."""
    return all(work.is_completed() for work in works)


def wait_all(works: list) -> None:
    """Wait for every collective in ``works``."""
    for work in works:
        work.wait()


def all_reduce_sum_max(wire: torch.Tensor, split: int, group) -> list:
    """Start the two all-reduces of a statistics wire buffer: ``SUM`` over ``wire[:split]``
    (counts, sums, flags) and ``MAX`` over ``wire[split:]`` (maxima, codes). On CUDA the
    current stream waits for them and the host does not (returns no handles); on CPU (gloo)
    returns the work handles to wait on when the host reads the result."""
    works = [
        dist.all_reduce(wire[:split], dist.ReduceOp.SUM, group=group, async_op=True),
        dist.all_reduce(wire[split:], dist.ReduceOp.MAX, group=group, async_op=True),
    ]
    if wire.device.type == "cuda":
        for work in works:
            work.wait()  # orders the current stream after the collective; no host sync
        return []
    return works
