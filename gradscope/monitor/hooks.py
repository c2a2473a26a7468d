"""Backward-pass hooks: when each gradient is final, and when a backward pass ends.

In ``mode="backward"`` a ``register_post_accumulate_grad_hook`` on every watched parameter
hands the monitor each gradient as soon as autograd has finished accumulating it. The first
hook of a backward pass queues a callback on the autograd engine that runs when the pass
ends (as DDP does), which is when the monitor may stop waiting for gradients. With gradient
accumulation only the last backward pass of an optimisation step is measured, when the
gradients are complete: :class:`BackwardPasses` knows which pass that is (the
``accumulation_steps``-th, or the one a trainer says is last) and the order in which the
measured pass's gradients became final.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch


class GradHook:
    """A parameter's post-accumulate-grad hook: calls ``monitor._on_grad(index, param)``.

    The monitor is held weakly, so that a monitor dropped without ``close()`` does not stay
    alive through the model that holds its hooks.
    """

    __slots__ = ("index", "monitor")

    def __init__(self, monitor, index: int) -> None:
        self.monitor = weakref.ref(monitor)
        self.index = index

    def __call__(self, param: torch.Tensor) -> None:
        monitor = self.monitor()
        if monitor is not None:
            monitor._on_grad(self.index, param)


def register_grad_hooks(monitor, params: Sequence[torch.nn.Parameter]) -> list:
    """A :class:`GradHook` on every parameter that requires grad; returns the handles."""
    return [
        p.register_post_accumulate_grad_hook(GradHook(monitor, index))
        for index, p in enumerate(params)
        if p.requires_grad
    ]


def remove_handles(handles: list) -> None:
    """Remove hooks (idempotent: the list is emptied)."""
    for handle in handles:
        handle.remove()
    handles.clear()


def queue_end_of_backward(callback: Callable[[], None]) -> bool:
    """Run ``callback`` when the running backward pass ends; False if that cannot be arranged."""
    try:
        torch.autograd.Variable._execution_engine.queue_callback(callback)
        return True
    except Exception:
        return False


class BackwardPasses:
    """The backward passes of the open optimisation step.

    Args:
        accumulation_steps: backward passes per optimisation step, the last of which is
            measured; or a function of no arguments, asked as each pass begins, that says
            whether it is the step's last pass (for trainers whose last window may be
            shorter, e.g. ``lambda: accelerator.sync_gradients``). Only the first pass it
            calls last is measured.
        params: watched parameters (the length of :attr:`order`).

    Attributes:
        open: a backward pass is running (a gradient arrived, its end has not been seen).
        measuring: the running pass is the one measured.
        order: int64 ``(P,)``, the position in which each parameter's gradient became final
            during the measured pass (0 first), -1 if it has not.
    """

    def __init__(self, accumulation_steps: int, params: int) -> None:
        self.accumulation_steps = accumulation_steps
        self.open = False
        self.measuring = False
        self.finished = 0
        self.order = np.full(params, -1, dtype=np.int64)
        self._next = 0
        self._measured = False  # a pass of this step was measured

    def begin(self) -> bool:
        """A gradient arrived. True when it opens a new pass (the caller then arranges to
        hear of its end and calls :meth:`end`)."""
        if self.open:
            return False
        self.open = True
        if callable(self.accumulation_steps):
            self.measuring = not self._measured and bool(self.accumulation_steps())
        else:
            self.measuring = self.finished == self.accumulation_steps - 1
        self._measured |= self.measuring
        return True

    def arrived(self, index: int) -> None:
        """Parameter ``index``'s gradient became final in the measured pass."""
        self.order[index] = self._next
        self._next += 1

    def end(self) -> bool:
        """The running pass ended; returns whether it was the measured one."""
        self.open = False
        self.finished += 1
        measured, self.measuring = self.measuring, False
        return measured

    def reset(self) -> None:
        """The optimisation step is over (``mon.step()``): start counting again."""
        self.open = False
        self.measuring = False
        self.finished = 0
        self.order[:] = -1
        self._next = 0
        self._measured = False


def failure_reporter(monitor) -> Callable[[BaseException], None]:
    """``monitor._fail`` (under its lock), holding the monitor weakly: hooks must not keep a
    dropped monitor alive."""
    ref = weakref.ref(monitor)

    def report(error: BaseException) -> None:
        alive = ref()
        if alive is not None:
            with alive._lock:
                alive._fail(error)

    return report


def release(handles: list, forward=None) -> None:
    """Remove a monitor's backward hooks and, if it has forward statistics, its module hooks
    (what a dropped monitor's finalizer does)."""
    remove_handles(handles)
    if forward is not None:
        forward.remove()
