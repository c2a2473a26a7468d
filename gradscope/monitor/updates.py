"""Update tracking: how far each optimizer step moves the weights, relative to their size.

With ``track_updates=True`` the monitor hooks the optimizer: just before ``step()`` on a
sampled step it copies the watched parameters (one copy, allocated once and reused: the
memory cost is one more copy of the watched parameters, in their own dtypes), and just after
it computes, per parameter, ``||w_before||`` and ``||w_after - w_before||`` (in float32 or
better, whatever the parameter dtype). Their ratio is the classic learning-rate health check:
about 1e-3 per step is typical, far below means learning has stalled, far above means it is
unstable. On CUDA the norms reach the host like the statistics: pinned memory, an event, no
synchronisation.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import torch


class UpdateTracker:
    """Per-parameter weight and update norms around ``optimizer.step()`` on sampled steps.

    Args:
        optimizer: the optimizer whose ``step()`` applies the updates.
        params: the watched parameters.
        sampled_step: a bound method returning the monitor step the coming optimizer step
            belongs to, or None when that step is not sampled.
    """

    FAILURE = ("updates", "measuring the optimizer's update", "update norms")
    """How :meth:`gradscope.monitor.failures.Failures.report_hook_errors` names a failure here."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.nn.Parameter],
        sampled_step: Callable[[], int | None],
    ) -> None:
        self._params = list(params)
        # Held weakly: the optimizer keeps these hooks, and must not keep the monitor alive.
        self._sampled_step = weakref.WeakMethod(sampled_step)
        self._before: list[torch.Tensor] | None = None
        self._step: int | None = None
        self._in_flight: deque = deque()
        self._done: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        self.error: BaseException | None = None

    def _pre_step(self, optimizer, args, kwargs) -> None:
        try:
            sampled_step = self._sampled_step()
            self._step = None if sampled_step is None else sampled_step()
            if self._step is None:
                return
            with torch.no_grad():
                if self._before is None:
                    self._before = [torch.empty_like(p) for p in self._params]
                torch._foreach_copy_(self._before, [p.detach() for p in self._params])
        except BaseException as error:
            self.error, self._step = error, None

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._step is None:
            return
        try:
            with torch.no_grad():
                pairs = zip(self._params, self._before, strict=True)
                norms = torch.stack([_weight_and_update_sq(p.detach(), before) for p, before in pairs])
            if norms.device.type == "cuda":
                host = torch.empty(norms.shape, dtype=norms.dtype, pin_memory=True)
                host.copy_(norms, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(norms.device))
                self._in_flight.append((self._step, host, event))
            else:
                self._done.append((self._step, norms[:, 0].numpy().copy(), norms[:, 1].numpy().copy()))
        except BaseException as error:
            self.error = error
        finally:
            self._step = None

    def completed(self, block: bool = False) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(step, weight_sq (P,), update_sq (P,)) of finished optimizer steps, oldest first."""
        while self._in_flight:
            step, host, event = self._in_flight[0]
            if block:
                event.synchronize()
            elif not event.query():
                break
            self._in_flight.popleft()
            values = host.numpy()
            self._done.append((step, values[:, 0].copy(), values[:, 1].copy()))
        done, self._done = self._done, []
        return done

    def take_error(self) -> BaseException | None:
        """The error met in the optimizer's hooks since the last call (once), or None. The
        step it happened in records no update norms; its gradient statistics stand."""
        error, self.error = self.error, None
        return error

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._before = None
        self._params = []
        self._in_flight.clear()


def _weight_and_update_sq(after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """float64 [||before||**2, ||after - before||**2], computed in float32 (float64 stays)."""
    wide = torch.float64 if after.dtype == torch.float64 else torch.float32
    before = before.to(wide)
    weight = torch.linalg.vector_norm(before)
    update = torch.linalg.vector_norm(after.to(wide) - before)
    return torch.stack([weight, update]).double().square()
