"""A monitor's capture engines: which engine measures which watched parameter, step by step.

Parameters are grouped once, at ``watch()``, by the engine that reads them
(:func:`gradscope.stats.dispatch.engine_for`: the Triton kernels on a device, or NumPy).
Each engine gets one capture (:mod:`gradscope.monitor.capture`) with a row per parameter it
measures. :class:`Engines` routes each final gradient to its capture, starts a capture when
its first gradient of a sampled step arrives (with the GradScaler's unscaling factor),
finishes the step, and puts the rows that reach the host back in watched-parameter order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from gradscope.distributed.sharded import CombinedRows, ShardedRows
from gradscope.distributed.topology import Topology, local_tensor
from gradscope.monitor.capture import HostCapture, KernelCapture
from gradscope.stats import host_backend, layout
from gradscope.stats.dispatch import Engine, engine_for, is_host

InvScale = Callable[[Engine], "torch.Tensor | float | None"]
"""Returns what an engine multiplies gradients by to unscale them (None: nothing)."""


def spare_cores() -> bool:
    """True when autograd (torch's intra-op threads) leaves CPU cores idle for a capture worker."""
    return host_backend.default_num_threads() > torch.get_num_threads()


class Engines:
    """The captures of one monitor (module docstring).

    Args:
        params: the watched parameters.
        backend: one of :data:`gradscope.stats.dispatch.BACKENDS`.
        mode: the monitor's mode (in backward mode a CPU kernel measures large gradients on
            a worker, overlapping autograd, when cores are spare).
        topology: the model's layout over ranks; sharded gradients are combined across ranks.
        inv_scale: see :data:`InvScale`.

    Attributes:
        captures: engine -> capture.
        present: bool ``(P,)``, the parameters measured in the open step.
        started: engines whose capture is open in this step.
        histogram: whether the open step's rows get their histograms (else light rows,
            :mod:`gradscope.stats.layout`); the monitor sets it per sampled step.
        at_once: bool ``(P,)``, when :attr:`gathers_at_end`: the parameters whose gradients
            the CPU capture's worker measures as soon as they are final
            (:meth:`gradscope.monitor.capture.HostCapture.takes_at_once`).

    Raises:
        ValueError: ``backend="triton"`` for parameters the kernels cannot read; parameters
            on several devices in a run whose rows are combined or hashed across ranks.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        backend: str,
        mode: str,
        topology: Topology,
        inv_scale: InvScale,
        one_device: bool = False,
    ) -> None:
        groups: dict[Engine, list[int]] = {}
        for index, p in enumerate(params):
            groups.setdefault(engine_for(p.device, backend, "parameters", caller="watch"), []).append(index)
        if len(groups) > 1 and (topology.kind == "sharded" or one_device):
            devices = sorted({str(p.device) for p in params})
            raise ValueError(
                f"watch: in a distributed run the watched parameters must be on one device; found {devices}"
            )
        self._inv_scale = inv_scale
        self._sharded = topology.kind == "sharded"
        self.captures: dict[Engine, KernelCapture | HostCapture] = {}
        self._route: list[tuple[Engine, int]] = [None] * len(params)  # parameter -> (engine, its row there)
        for key, members in groups.items():
            device = torch.device("cpu") if is_host(key) else key
            combiner = ShardedRows(topology, np.array(members), device) if self._sharded else None
            if is_host(key):
                overlap = mode == "backward" and spare_cores()
                self.captures[key] = HostCapture(len(members), key, overlap=overlap, combiner=combiner)
            else:
                self.captures[key] = KernelCapture(key, len(members), combiner=combiner)
            for local, index in enumerate(members):
                self._route[index] = (key, local)
        self._members = {key: np.array(members) for key, members in groups.items()}
        self.present = np.zeros(len(params), dtype=bool)
        self.started: set[Engine] = set()
        self.histogram = True
        capture = self.captures[self.first] if self.gathers_at_end else None
        self.at_once = np.array([capture is not None and capture.takes_at_once(p.numel()) for p in params], dtype=bool)

    @property
    def gathers_at_end(self) -> bool:
        """True when one capture, a CPU kernel, measures every parameter (and its rows are not
        combined across ranks): it reads a backward pass's gradients together when the pass
        ends, but for those it takes :attr:`at_once`, so the hooks need only note which
        arrived (:class:`gradscope.monitor.hooks.Arrivals`)."""
        if len(self.captures) != 1 or self._sharded:
            return False
        return isinstance(self.captures[self.first], HostCapture)

    @property
    def first(self) -> Engine:
        """The first engine (the only one in runs that need a single device)."""
        return next(iter(self.captures))

    def _start(self, key: Engine) -> None:
        self.captures[key].start(self._inv_scale(key), histogram=self.histogram)
        self.started.add(key)

    def add(self, index: int, grad: torch.Tensor) -> None:
        """Parameter ``index``'s gradient is final: hand it to its capture."""
        key, local = self._route[index]
        if key not in self.started:
            self._start(key)
        self.captures[key].add(local, local_tensor(grad))
        self.present[index] = True

    def add_many(self, indices: Sequence[int], grads: Sequence[torch.Tensor]) -> None:
        """These parameters' final gradients, together, none of them :attr:`at_once` (when
        :attr:`gathers_at_end`: one capture, whose rows are the parameters' own indices)."""
        key = self.first
        if key not in self.started:
            self._start(key)
        self.captures[key].add_all(indices, grads)
        self.present[indices] = True

    def add_all(self, params: Sequence[torch.nn.Parameter], took_part: Sequence[bool] | None = None) -> None:
        """Measure every parameter's gradient now (step mode; DDP once averaging is done).

        ``took_part``: which parameters autograd gave a gradient in this step
        (:meth:`gradscope.monitor.hooks.BackwardPasses.took_part`); the others' ``.grad``, if
        any, is no gradient of this step and they stay absent. None: every ``.grad`` counts.
        """
        grads: dict[Engine, tuple[list[int], list[torch.Tensor]]] = {}
        for index, p in enumerate(params):
            if p.grad is not None and (took_part is None or took_part[index]):
                key, local = self._route[index]
                locals_, tensors = grads.setdefault(key, ([], []))
                locals_.append(local)
                tensors.append(local_tensor(p.grad))
                self.present[index] = True
        for key, (locals_, tensors) in grads.items():
            self._start(key)
            self.captures[key].add_all(locals_, tensors)

    def end_backward(self) -> None:
        """The measured backward pass ended: launch or wait for what was handed over."""
        for key in self.started:
            self.captures[key].end_backward()

    def device_rows(self) -> torch.Tensor:
        """The open step's rows of the (single) started engine, on its device."""
        (key,) = self.started
        return self.captures[key].device_rows()

    def finish(self, step: int, failed: bool) -> list[Exception]:
        """Close the sampled ``step`` on every started engine (sharded: on every engine, so
        that this rank takes part in every combining collective); returns the errors met."""
        if self._sharded:
            for key, capture in self.captures.items():
                if key not in self.started:  # no gradient here: this rank still combines zeros
                    capture.start(None, histogram=self.histogram)
                    self.started.add(key)
        errors = []
        for key in self.started:
            try:
                self.captures[key].finish(step, failed=failed)
            except Exception as error:
                errors.append(error)
        return errors

    def reset(self) -> None:
        """The step is over: nothing started, nothing present."""
        self.started = set()
        self.present[:] = False

    def completed(self, block: bool) -> list[tuple[int, Engine, object]]:
        """``(step, engine, payload)`` of steps whose rows reached the host (see
        :data:`gradscope.monitor.capture.Completed`); with ``block``, waits for them all."""
        return [(step, key, rows) for key, capture in self.captures.items() for step, rows in capture.completed(block)]

    def param_rows(self, arrived: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step's payloads by engine, as per-parameter arrays: rows float64
        ``(P, ROW_WIDTH)``, and (sharded runs) the lowest rank whose part held NaN/Inf
        (-1: none) and how many ranks' parts did."""
        n_params = len(self._route)
        rows = np.zeros((n_params, layout.ROW_WIDTH))
        rank = np.full(n_params, -1, dtype=np.int64)
        ranks = np.zeros(n_params, dtype=np.int64)
        for key, payload in arrived.items():
            members = self._members[key]
            if isinstance(payload, CombinedRows):
                rows[members] = payload.rows
                rank[members] = payload.nonfinite_rank
                ranks[members] = payload.nonfinite_ranks
            elif payload is not None:
                rows[members] = payload
        return rows, rank, ranks

    def raise_error(self) -> None:
        """Raise (once) an error a capture met off the training thread."""
        for capture in self.captures.values():
            error = getattr(capture, "error", None)
            if error is not None:
                capture.error = None
                raise error

    def close(self) -> None:
        """Release every capture, and the GradScaler and optimizer ``inv_scale`` holds."""
        for capture in self.captures.values():
            capture.close()
        self._inv_scale = None
