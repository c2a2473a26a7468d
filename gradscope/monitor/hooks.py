"""Backward-pass hooks: when each gradient is final, and when a backward pass ends.

In ``mode="backward"`` a ``register_post_accumulate_grad_hook`` on every watched parameter
tells the monitor's backward receiver (:mod:`gradscope.monitor.backward`) of each gradient as
soon as autograd has finished accumulating it. The first hook of a backward pass queues a
callback on the autograd engine that runs when the pass ends (as DDP does), which is when
the receiver may stop waiting for gradients. With gradient
accumulation only the last backward pass of an optimisation step is measured, when the
gradients are complete: :class:`BackwardPasses` knows which pass that is (the
``accumulation_steps``-th, or the one a trainer says is last) and the order in which the
measured pass's gradients became final.

In ``mode="step"`` (gradients read from ``.grad`` at ``mon.step()``) a hook of C code only
marks each parameter autograd gives a gradient in the step (:func:`register_participation_hooks`):
a parameter that took no part in the step (an expert no token was routed to) keeps in ``.grad``
what ``zero_grad(set_to_none=False)`` left there, zeros that are no gradient of this step.
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch


class GradHook:
    """A parameter's post-accumulate-grad hook: calls ``receiver.on_grad(index, param)``.

    The receiver (:class:`gradscope.monitor.backward.BackwardReceiver`) is held weakly, so
    that the model holding the hooks does not keep a monitor dropped without ``close()``
    alive through it.
    """

    __slots__ = ("index", "receiver")

    def __init__(self, receiver, index: int) -> None:
        self.receiver = weakref.ref(receiver)
        self.index = index

    def __call__(self, param: torch.Tensor) -> None:
        receiver = self.receiver()
        if receiver is not None:
            receiver.on_grad(self.index, param)


def register_grad_hooks(receiver, params: Sequence[torch.nn.Parameter]) -> list:
    """A :class:`GradHook` on every parameter that requires grad; returns the handles."""
    return [
        p.register_post_accumulate_grad_hook(GradHook(receiver, index))
        for index, p in enumerate(params)
        if p.requires_grad
    ]


class Arrivals:
    """The cheapest backward hooks, for engines that measure (nearly) everything when backward ends.

    Each parameter's hook only appends the parameter to a list (the order in which the
    gradients became final); the first hook of a backward pass also calls the receiver's
    ``on_first_arrival()`` (which arranges to hear of the pass's end). When the pass ends
    the receiver takes the list, and the gradients are measured together: no per-gradient
    work in autograd's path but one list append. The hooks of the parameters ``at_once``
    also hand the gradient to the receiver's ``on_grad_at_once(index, param)`` (a worker
    measures it while backward goes on); they stay in the list, which keeps the order.

    Args:
        receiver: held weakly (:class:`gradscope.monitor.backward.BackwardReceiver`); its
            ``on_first_arrival()`` is called on a pass's first gradient.
        params: the watched parameters (indices are positions in this sequence).
        at_once: bool ``(P,)`` or None (none): whose gradients are handed over on arrival.

    Attributes:
        handles: the hook handles (see :func:`remove_handles`).
    """

    def __init__(self, receiver, params: Sequence[torch.nn.Parameter], at_once: np.ndarray | None = None) -> None:
        self._index_of = {id(p): index for index, p in enumerate(params)}
        self._log: list[torch.Tensor] = []
        ref = weakref.ref(receiver)
        log, append = self._log, self._log.append

        def hook(param: torch.Tensor) -> None:
            if not log:
                alive = ref()
                if alive is not None:
                    alive.on_first_arrival()
            append(param)

        def handing_over(index: int) -> Callable[[torch.Tensor], None]:
            def hook_at_once(param: torch.Tensor) -> None:
                hook(param)
                alive = ref()
                if alive is not None:
                    alive.on_grad_at_once(index, param)

            return hook_at_once

        self.handles = [
            p.register_post_accumulate_grad_hook(
                handing_over(index) if at_once is not None and at_once[index] else hook
            )
            for index, p in enumerate(params)
            if p.requires_grad
        ]

    def __len__(self) -> int:
        return len(self._log)

    def take(self) -> tuple[list[int], list[torch.Tensor]]:
        """The parameters that arrived since the last take, in arrival order: ``(indices,
        gradients)``; empties the list."""
        arrived, self._log[:] = list(self._log), []
        index_of = self._index_of
        return [index_of[id(p)] for p in arrived], [p.grad for p in arrived]

    def clear(self) -> None:
        self._log.clear()


def register_participation_hooks(marks: list, params: Sequence[torch.nn.Parameter]) -> list:
    """On every parameter that requires grad, a hook that stores the parameter in its slot of
    ``marks`` (:attr:`BackwardPasses.marks`) when autograd accumulates its gradient; returns
    the handles.

    The hook is ``functools.partial(operator.setitem, marks, index)``: C code only, so no Python
    frame runs in autograd's path and no tensor is touched (the parameter it stores is the
    model's own).
    """
    return [
        p.register_post_accumulate_grad_hook(functools.partial(operator.setitem, marks, index))
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
    except RuntimeError:  # "Final callbacks can only be installed during backward pass"
        return False


def inside_outer_backward() -> bool:
    """True in an end-of-backward callback of a *nested* backward pass: one a reentrant
    activation checkpoint (``checkpoint(..., use_reentrant=True)``) runs from inside a node of
    the backward pass that called it, which goes on afterwards."""
    try:
        return torch._C._current_autograd_node() is not None
    except (AttributeError, RuntimeError):  # a private API: a torch without it is taken to nest nothing
        return False


def queue_after_outer_node(callback: Callable[[], None]) -> bool:
    """From a nested backward's end-of-backward callback (:func:`inside_outer_backward`): run
    ``callback`` at the end of the backward pass that runs the node the nested pass is inside
    of (a post-hook on that node queues it there, once the node finishes); False if that
    cannot be arranged."""
    try:
        node = torch._C._current_autograd_node()
        handle = None

        def queue_on_the_outer_pass(grad_inputs, grad_outputs) -> None:
            handle.remove()
            if not queue_end_of_backward(callback):
                callback()

        handle = node.register_hook(queue_on_the_outer_pass)
        return True
    except (AttributeError, RuntimeError):
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
        marks: ``(P,)`` list, in step mode: the parameter in the slot of each parameter autograd
            gave a gradient in any pass of the open step, None in the others'
            (:func:`register_participation_hooks`; see :meth:`took_part`).
    """

    def __init__(self, accumulation_steps: int, params: int) -> None:
        self.accumulation_steps = accumulation_steps
        self.open = False
        self.measuring = False
        self.finished = 0
        self.order = np.full(params, -1, dtype=np.int64)
        self.marks: list = [None] * params
        self._unmarked = (None,) * params
        self._next = 0
        self._measured = False  # a pass of this step was measured
        self._earlier: set[int] = set()  # parameters that got a gradient in an unmeasured pass
        self.needs_callback = False  # the open pass's callback ran at a nested backward's end

    def begin(self) -> bool:
        """A gradient arrived. True when it opens a new pass, or when the pass's end-of-pass
        callback was spent by a nested backward (:attr:`needs_callback`): the caller then
        arranges to hear of its end and calls :meth:`end`."""
        if self.open:
            needs, self.needs_callback = self.needs_callback, False
            return needs
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

    def arrived_all(self, indices: Sequence[int]) -> None:
        """These parameters' gradients became final in the measured pass, in this order."""
        self.order[indices] = np.arange(self._next, self._next + len(indices))
        self._next += len(indices)

    def end(self) -> bool:
        """The running pass ended; returns whether it was the measured one."""
        self.open = False
        self.finished += 1
        measured, self.measuring = self.measuring, False
        return measured

    def arrived_earlier(self, indices) -> None:
        """These parameters' gradients arrived in a pass of the step that is not measured (an
        earlier micro-batch of gradient accumulation)."""
        self._earlier.update(indices)

    def only_earlier(self) -> list[int]:
        """Parameters that got a gradient in an earlier pass of the step but none in the
        measured one (an expert routed only in an earlier micro-batch): their ``.grad``
        holds their whole accumulated gradient, measured at the measured pass's end."""
        return sorted(i for i in self._earlier if self.order[i] < 0)

    def took_part(self) -> list[bool] | None:
        """Per parameter, whether autograd gave it a gradient in the open step (:attr:`marks`);
        None when no parameter is marked: not tracked (backward mode, distributed runs), or
        gradients set by hand rather than by backward, where every ``.grad`` counts."""
        taken = [mark is not None for mark in self.marks]
        return taken if any(taken) else None

    def reset(self) -> None:
        """The optimisation step is over (``mon.step()``): start counting again."""
        self.marks[:] = self._unmarked
        self.open = False
        self.measuring = False
        self.finished = 0
        self.order[:] = -1
        self._next = 0
        self._measured = False
        self._earlier.clear()
        self.needs_callback = False


def release(handles: list, forward=None) -> None:
    """Remove a monitor's backward hooks and, if it has forward statistics, its module hooks."""
    remove_handles(handles)
    if forward is not None:
        forward.remove()
