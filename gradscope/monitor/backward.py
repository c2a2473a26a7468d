"""The monitor's side of the backward pass: gradients arriving, and the end of each pass.

:class:`BackwardReceiver` is the part of :class:`gradscope.Monitor` that backward's hooks
call. Two ways to hear of gradients (:mod:`gradscope.monitor.hooks` registers the hooks):

* **per gradient** (:meth:`BackwardReceiver.on_grad`): each final gradient is handed to its
  capture as it arrives — the Triton kernels launch buckets of them while backward still
  runs, a CPU worker measures them beside autograd, and DDP's are noted until averaging ends;
* **at the end of the pass** (:class:`gradscope.monitor.hooks.Arrivals`), when one CPU
  capture measures every gradient: a hook only appends its parameter to a list, and the
  gradients are taken together when the pass ends. On a model with hundreds of small
  parameters this is what keeps monitoring cheap: per gradient, one list append inside
  autograd and a few hundred nanoseconds of bookkeeping after it. When the capture has a
  worker (cores autograd leaves free), the hooks of large parameters
  (:attr:`gradscope.monitor.engines.Engines.at_once`) also hand their gradient over at
  once (:meth:`BackwardReceiver.on_grad_at_once`), to be measured while backward goes on.

Both record the order in which gradients became final (where a NaN first appeared in
backward) and measure only the last pass of an optimisation step under gradient accumulation.

In ``mode="step"`` nothing is measured in backward, but in a single process hooks mark
which parameters autograd gave a gradient in the step
(:func:`gradscope.monitor.hooks.register_participation_hooks`), and ``mon.step()`` reads
``.grad`` only of those (:meth:`gradscope.monitor.hooks.BackwardPasses.took_part`): an
expert no token was routed to is absent for the step, as in backward mode, not a dead layer
of the zeros ``zero_grad(set_to_none=False)`` left. In DDP and FSDP2 runs another rank's
gradient may reach a parameter this rank's backward did not touch: there every ``.grad`` counts.

The receiver is given what it touches: the watched parameters, the capture engines, the
backward-pass counter, the open step (read, never moved), the failures part (a failure in a
hook voids the open step), the monitor's lock, the mode and the model's topology. The hooks
hold it weakly, and it holds nothing that leads back to the monitor: a monitor dropped
without ``close()`` is freed at once and its finalizer removes the hooks (:attr:`handles`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

import numpy as np
import torch

from gradscope.distributed.topology import Topology
from gradscope.monitor import hooks
from gradscope.monitor.engines import Engines
from gradscope.monitor.failures import Failures
from gradscope.monitor.schedule import OpenStep


class BackwardReceiver:
    """Backward's hook callbacks for one monitor (module docstring); registers the hooks.

    Args:
        params: the watched parameters (hook indices are positions in this sequence).
        engines: the captures the gradients are handed to.
        passes: the open step's backward passes (which one is measured, the arrival order).
        open_step: the monitor's open step (sampled or not; which step a failure voids).
        failures: where a failure in a hook goes.
        lock: the monitor's lock, held while a hook touches the captures.
        mode: ``"backward"`` registers hooks that hand gradients over; ``"step"`` measures
            everything at ``mon.step()`` (in a single process, hooks only mark which
            parameters took part in the step: :attr:`passes` ``.marks``).
        topology: the model's layout over ranks. DDP (``"replicated"``): gradients are
            measured when averaging has finished, at the end of backward, not as they arrive.

    Attributes:
        arrivals: the :class:`~gradscope.monitor.hooks.Arrivals` hooks when the gradients
            are taken at the end of the pass (but those handed over on arrival,
            :attr:`~gradscope.monitor.engines.Engines.at_once`); None when every gradient is
            handed over one by one.
        handles: the hook handles (emptied when the hooks are removed).
        closed: hooks that still fire after the monitor closed do nothing.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        engines: Engines,
        passes: hooks.BackwardPasses,
        open_step: OpenStep,
        failures: Failures,
        lock: threading.RLock,
        mode: str,
        topology: Topology,
    ) -> None:
        self._params = params
        self._engines = engines
        self._passes = passes
        self._open = open_step
        self._failures = failures
        self._lock = lock
        self._replicated = replicated = topology.kind == "replicated"  # read in every hook call
        self.closed = False
        self.arrivals: hooks.Arrivals | None = None
        if mode != "backward":
            alone = topology.kind == "single" and topology.world == 1
            self.handles: list = hooks.register_participation_hooks(passes.marks, params) if alone else []
        elif engines.gathers_at_end and not replicated:
            self.arrivals = hooks.Arrivals(self, params, engines.at_once)
            self.handles = self.arrivals.handles
        else:
            self.handles = hooks.register_grad_hooks(self, params)

    def fail(self, error: BaseException) -> None:
        """A failure inside a hook (backward's, or forward statistics'): the open step is void."""
        with self._lock:
            self._failures.fail(self._open.index, error)

    def _open_pass(self) -> None:
        """A pass's first gradient arrived: arrange to hear of the pass's end."""
        if self._passes.begin() and not hooks.queue_end_of_backward(self._on_backward_end):
            self._failures.warn_once(
                "callback", "gradscope: cannot detect the end of backward; measuring at mon.step()"
            )

    def on_grad(self, index: int, param: torch.Tensor) -> None:
        """:class:`~gradscope.monitor.hooks.GradHook`: parameter ``index``'s gradient is final."""
        if self.closed or not self._open.sampled:  # unsampled step: nothing to do
            return
        try:
            with self._lock:
                self._open_pass()
                if not self._passes.measuring:
                    self._passes.arrived_earlier((index,))  # measured at the measured pass's end
                    return
                if self._failures.is_void(self._open.index):
                    return  # void already: one failure per step is enough
                self._passes.arrived(index)
                if self._replicated:
                    return  # DDP has not averaged this gradient yet: measured when backward ends
                self._engines.add(index, param.grad)
        except Exception as error:
            self.fail(error)

    def on_grad_at_once(self, index: int, param: torch.Tensor) -> None:
        """:class:`~gradscope.monitor.hooks.Arrivals`: parameter ``index`` (one of
        :attr:`~gradscope.monitor.engines.Engines.at_once`) arrived and was noted; hand its
        gradient to the capture now (its place in the order is taken at the pass's end)."""
        if self.closed or not self._open.sampled:
            return
        try:
            with self._lock:
                if not self._passes.measuring or self._failures.is_void(self._open.index):
                    return
                self._engines.add(index, param.grad)
        except Exception as error:
            self.fail(error)

    def on_first_arrival(self) -> None:
        """:class:`~gradscope.monitor.hooks.Arrivals`: the first gradient of a pass arrived."""
        if self.closed:
            return
        try:
            with self._lock:
                if not self._open.sampled:  # unsampled: only empty the list when the pass ends
                    if not hooks.queue_end_of_backward(self.arrivals.clear):
                        self.arrivals.clear()
                    return
                self._open_pass()
        except Exception as error:
            self.fail(error)

    def _take_arrivals(self, measured: bool) -> None:
        """Hand the gradients that arrived in the pass to the captures (if ``measured``)."""
        indices, grads = self.arrivals.take()
        if not measured:
            self._passes.arrived_earlier(indices)
        elif indices and not self._failures.is_void(self._open.index):
            self._passes.arrived_all(indices)
            gathered = ~self._engines.at_once[indices]  # the others were handed over on arrival
            if not gathered.all():
                indices = np.asarray(indices)[gathered].tolist()
                grads = list(itertools.compress(grads, gathered))
            if indices:
                self._engines.add_many(indices, grads)

    def _on_backward_end(self, deferred: bool = False) -> None:
        try:
            with self._lock:
                if not deferred and hooks.inside_outer_backward():
                    # A reentrant checkpoint's nested backward ended, not the pass: hear of the
                    # outer backward's end instead. Failing that, the next gradient queues the
                    # callback again (what arrived so far is handed over, so that the next
                    # arrival announces itself), or mon.step() ends the pass.
                    if hooks.queue_after_outer_node(self._on_backward_end):
                        return
                    self._passes.needs_callback = True
                    if self.arrivals is not None:
                        self._take_arrivals(self._passes.measuring)
                    return
                if self._replicated and self._passes.measuring and not deferred:
                    # DDP queues its own end-of-backward callback (which finishes averaging)
                    # after ours: measure from a callback queued behind it.
                    if hooks.queue_end_of_backward(lambda: self._on_backward_end(deferred=True)):
                        return
                measured = self._passes.end()
                if self.arrivals is not None:
                    self._take_arrivals(measured)
                if measured:
                    if self._replicated:
                        self._engines.add_all(self._params)
                    else:
                        self._add_only_earlier()
                        self._engines.end_backward()
        except Exception as error:
            self.fail(error)

    def _add_only_earlier(self) -> None:
        """Measure the parameters whose gradient arrived only in earlier passes of the step."""
        late = [i for i in self._passes.only_earlier() if self._params[i].grad is not None]
        if late and not self._failures.is_void(self._open.index):
            grads = [self._params[i].grad for i in late]
            self._passes.arrived_all(late)
            if self.arrivals is not None:
                self._engines.add_many(late, grads)
            else:
                for index, grad in zip(late, grads, strict=True):
                    self._engines.add(index, grad)

    def close_open_pass(self) -> None:
        """At ``mon.step()``: a pass whose end was never heard of (the callback could not be
        queued, or it ran at a nested backward's end and no gradient came after) ends now;
        gradients of unsampled steps are dropped."""
        if self._passes.needs_callback and self._passes.open:
            self._on_backward_end(deferred=True)
        if self.arrivals is not None and len(self.arrivals):
            self._take_arrivals(self._passes.open and self._passes.measuring)

    def close(self) -> None:
        """Hooks that still fire do nothing, and the parameters are let go (the monitor's
        finalizer removes the hooks)."""
        self.closed = True
        self._params = ()
        self._passes.reset()  # let go of the parameters a participation mark holds
        if self.arrivals is not None:
            self.arrivals.clear()
