"""The monitor's side of the backward pass: gradients arriving, and the end of each pass.

Two ways to hear of gradients (:mod:`gradscope.monitor.hooks` registers the hooks):

* **per gradient** (:meth:`BackwardReceiver._on_grad`): each final gradient is handed to its
  capture as it arrives — the Triton kernels launch buckets of them while backward still
  runs, a CPU worker measures them beside autograd, and DDP's are noted until averaging ends;
* **at the end of the pass** (:class:`gradscope.monitor.hooks.Arrivals`), when every capture
  measures the whole pass at its end anyway (a CPU kernel on the cores autograd was using):
  a hook only appends its parameter to a list, and the gradients are taken together when
  the pass ends. On a model with hundreds of small parameters this is what keeps
  monitoring cheap: per gradient, one list append inside autograd and a few hundred
  nanoseconds of bookkeeping after it.

Both record the order in which gradients became final (where a NaN first appeared in
backward) and measure only the last pass of an optimisation step under gradient accumulation.
"""

from __future__ import annotations

import torch

from gradscope.monitor import hooks


class BackwardReceiver:
    """Hook callbacks of :class:`gradscope.Monitor` (a part of it, like ``Acting``)."""

    def _install_grad_hooks(self) -> None:
        """Register the backward hooks that fit the captures (see the module docstring)."""
        self._arrivals = None
        if self.mode != "backward":
            self._handles = []
        elif self._engines.gathers_at_end and not self._replicated:
            self._arrivals = hooks.Arrivals(self, self._watched.params)
            self._handles = self._arrivals.handles
        else:
            self._handles = hooks.register_grad_hooks(self, self._watched.params)

    def _open_pass(self) -> None:
        """A pass's first gradient arrived: arrange to hear of the pass's end."""
        if self._passes.begin() and not hooks.queue_end_of_backward(self._on_backward_end):
            self._warn_once("callback", "gradscope: cannot detect the end of backward; measuring at mon.step()")

    def _on_grad(self, index: int, param: torch.Tensor) -> None:
        if self._closed or self._step % self.every:  # unsampled step: nothing to do
            return
        try:
            with self._lock:
                self._open_pass()
                if not self._passes.measuring or self._step in self._failed_steps:
                    return  # not measured, or void already: one failure per step is enough
                self._passes.arrived(index)
                if self._replicated:
                    return  # DDP has not averaged this gradient yet: measured when backward ends
                self._engines.add(index, param.grad)
        except Exception as error:
            self._fail(error)

    def _on_first_arrival(self) -> None:
        """:class:`~gradscope.monitor.hooks.Arrivals`: the first gradient of a pass arrived."""
        if self._closed:
            return
        try:
            with self._lock:
                if self._step % self.every:  # unsampled: only empty the list when the pass ends
                    if not hooks.queue_end_of_backward(self._arrivals.clear):
                        self._arrivals.clear()
                    return
                self._open_pass()
        except Exception as error:
            self._fail(error)

    def _take_arrivals(self, measured: bool) -> None:
        """Hand the gradients that arrived in the pass to the captures (if ``measured``)."""
        indices, grads = self._arrivals.take()
        if measured and indices and self._step not in self._failed_steps:
            self._passes.arrived_all(indices)
            self._engines.add_many(indices, grads)

    def _on_backward_end(self, deferred: bool = False) -> None:
        try:
            with self._lock:
                if self._replicated and self._passes.measuring and not deferred:
                    # DDP queues its own end-of-backward callback (which finishes averaging)
                    # after ours: measure from a callback queued behind it.
                    if hooks.queue_end_of_backward(lambda: self._on_backward_end(deferred=True)):
                        return
                measured = self._passes.end()
                if self._arrivals is not None:
                    self._take_arrivals(measured)
                if measured:
                    if self._replicated:
                        self._engines.add_all(self._watched.params)
                    else:
                        self._engines.end_backward()
        except Exception as error:
            self._fail(error)

    def _close_open_pass(self) -> None:
        """At ``mon.step()``: a measured pass whose end was never heard of (the callback
        could not be queued) is measured now; gradients of unsampled steps are dropped."""
        if self._arrivals is not None and len(self._arrivals):
            self._take_arrivals(self._passes.open and self._passes.measuring)
