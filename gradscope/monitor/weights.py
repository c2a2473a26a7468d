"""Weight reading for compression readiness (``watch(..., compression=True)``).

Just before ``optimizer.step()`` on a sampled step (the cadence of update tracking:
:mod:`gradscope.monitor.updates`), every watched parameter's *values* are read by the same
statistics engine as its gradient (:mod:`gradscope.stats`: the Triton kernels for CUDA
tensors, a CPU kernel otherwise), one statistics row per tensor, and with them two Taylor
terms of each tensor: ``Σ g·w``, the loss change a first-order model predicts if the tensor
were set to zero (with its sign), and ``Σ (g·w)²``, whose mean over minibatches is the
empirical-Fisher (Optimal Brain Damage) estimate of what zeroing each element costs, summed
over the elements. The gradients are the ones the optimizer is about to apply (accumulated,
and unscaled by a GradScaler, which unscales before it steps).

The two terms are one more read of each gradient and weight (an elementwise product and two
reductions per tensor, in float32, float64 for float64 tensors), on sampled steps only. They
are kept out of the gradient rows' own kernel on purpose: a column there would widen every
row of every run for quantities only this feature reads.

On CUDA the rows and dots reach the host like the gradient statistics: pinned memory and an
event, no synchronisation.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import torch

from gradscope.stats import host_backend, layout, triton_backend
from gradscope.stats.dispatch import engine_for, is_host
from gradscope.stats.inputs import flat_elements

Reading = tuple[int, np.ndarray, np.ndarray]
"""``(step, rows, taylor)``: float64 ``(P, ROW_WIDTH)`` statistics of each watched parameter's
values and float64 ``(P, 2)`` ``[Σ g·w, Σ (g·w)²]`` per parameter (0 without a gradient)."""


class WeightReader:
    """Statistics rows of the watched parameters' values, and ``Σ g·w``, before sampled steps.

    Args:
        optimizer: the optimizer whose ``step()`` applies the updates.
        params: the watched parameters.
        backend: the monitor's backend (:data:`gradscope.stats.dispatch.BACKENDS`).
        sampled_step: a bound method returning the monitor step the coming optimizer step
            belongs to, or None when that step is not sampled.
    """

    FAILURE = ("weights", "reading the weights", "weight reading")
    """How :meth:`gradscope.monitor.failures.Failures.report_hook_errors` names a failure here."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.nn.Parameter],
        backend: str,
        sampled_step: Callable[[], int | None],
    ) -> None:
        self._params = list(params)
        self.ndim = np.array([p.dim() for p in self._params], dtype=np.int64)
        self._engines = [engine_for(p.device, backend, "parameters", caller="watch") for p in self._params]
        self._sampled_step = weakref.WeakMethod(sampled_step)  # held weakly, as update tracking does
        self._in_flight: deque = deque()
        self._done: list[Reading] = []
        self._handle = optimizer.register_step_pre_hook(self._pre_step)
        self.error: BaseException | None = None

    def _pre_step(self, optimizer, args, kwargs) -> None:
        try:
            sampled_step = self._sampled_step()
            step = None if sampled_step is None else sampled_step()
            if step is not None:
                with torch.no_grad():
                    self._read(step)
        except BaseException as error:
            self.error = error

    def _read(self, step: int) -> None:
        rows = np.zeros((len(self._params), layout.ROW_WIDTH))
        dots = np.zeros((len(self._params), 2))
        on_host: dict[str, list[int]] = {}
        on_device: dict[torch.device, list[int]] = {}
        for index, engine in enumerate(self._engines):
            if is_host(engine):
                on_host.setdefault(engine, []).append(index)
            else:
                on_device.setdefault(engine, []).append(index)
        for kernel, members in on_host.items():
            values = [self._params[i].detach() for i in members]
            rows[members] = host_backend.host_rows(values, kernel)
            dots[members] = _taylor_terms([self._params[i] for i in members]).cpu().numpy()
        pending = []
        for device, members in on_device.items():
            rows_out = torch.empty((len(members), layout.ROW_WIDTH), dtype=torch.float64, device=device)
            flats = [flat_elements(self._params[i].detach()) for i in members]
            triton_backend.launch_rows(flats, rows_out, range(len(members)))  # the kernels' row layout
            out = torch.cat([rows_out, _taylor_terms([self._params[i] for i in members])], dim=1)
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=torch.cuda.is_available())
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event() if device.type == "cuda" else None
            if event is not None:
                event.record(torch.cuda.current_stream(device))
            pending.append((members, host, event))
        if pending:
            self._in_flight.append((step, rows, dots, pending))
        else:
            self._done.append((step, rows, dots))

    def completed(self, block: bool = False) -> list[Reading]:
        """The readings that reached the host, oldest first (with ``block``, all of them)."""
        while self._in_flight:
            step, rows, dots, pending = self._in_flight[0]
            events = [event for _, _, event in pending if event is not None]
            if block:
                for event in events:
                    event.synchronize()
            elif not all(event.query() for event in events):
                break
            self._in_flight.popleft()
            for members, host, _ in pending:
                values = host.numpy()
                rows[members] = values[:, : layout.ROW_WIDTH]
                dots[members] = values[:, layout.ROW_WIDTH :]
            self._done.append((step, rows, dots))
        done, self._done = self._done, []
        return done

    def take_error(self) -> BaseException | None:
        """The error met in the optimizer's hook since the last call (once), or None. The step
        it happened in has no weight reading; its gradient statistics stand."""
        error, self.error = self.error, None
        return error

    def close(self) -> None:
        self._handle.remove()
        self._params = []
        self._in_flight.clear()


TAYLOR_CHUNK = 1 << 24
"""Elements per piece when the Taylor terms are computed: the float32 temporaries stay under
64 MiB each however large a tensor is (a 50k x 4096 embedding would otherwise need 800 MiB)."""


def _taylor_terms(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """float64 ``(P, 2)``: ``[Σ g·w, Σ (g·w)²]`` of each parameter (0 where it has no
    gradient), computed in float32 (float64 for float64 parameters), :data:`TAYLOR_CHUNK`
    elements at a time."""
    terms = []
    for p in params:
        grad = p.grad
        total = torch.zeros(2, dtype=torch.float64, device=p.device)
        if grad is not None:
            wide = torch.float64 if p.dtype == torch.float64 else torch.float32
            grad = (grad.to_dense() if grad.is_sparse else grad).reshape(-1)
            weight = p.detach().reshape(-1)
            for start in range(0, weight.numel(), TAYLOR_CHUNK):
                piece = slice(start, start + TAYLOR_CHUNK)
                product = grad[piece].to(wide) * weight[piece].to(wide)
                total += torch.stack([product.sum(), torch.dot(product, product)]).double()
        terms.append(total)
    return torch.stack(terms) if terms else torch.zeros((0, 2), dtype=torch.float64)
