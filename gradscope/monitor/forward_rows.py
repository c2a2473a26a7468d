"""Per-step accumulators of forward statistics: one row per module input/output, no host sync.

A forward hook hands over the tensors of one module call; they are measured at once (a
later in-place operation may overwrite them) and combined into that module's row by the
row's declared rule (:data:`gradscope.stats.layout.COMBINE`), so a module called several
times in a step (shared blocks, gradient accumulation) has one row for all its calls. Each
row also keeps the sequence position of the first call whose tensors held NaN/Inf.

* :class:`HostRows` (NumPy backend): rows on the host, computed on the calling thread.
* :class:`DeviceRows` (Triton kernels): rows in a device buffer; each call launches the
  kernel into scratch rows and combines them into its row with a few small device
  operations on the current stream. At the end of the step the buffer is copied to pinned
  host memory and a CUDA event marks its arrival; nothing waits for the device.

Row ``i`` of the ``(2 * M)`` rows is module ``i % M``'s inputs (``i < M``) or outputs.

:class:`ForwardStep` carries one closed step's rows to the host — in a distributed run
after combining them across ranks (:class:`gradscope.distributed.rank_rows.RankRows`) — and
turns them into a :class:`gradscope.run.records.Forward` record.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gradscope.distributed.collectives import wait_all, works_done
from gradscope.distributed.rank_rows import RankRows
from gradscope.run import records
from gradscope.stats import host_backend, layout, triton_backend
from gradscope.stats.inputs import flat_elements

SEQ = layout.ROW_WIDTH
"""Extra column of a device row: sequence position of the first non-finite call (-1: none)."""

_COLUMNS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _columns(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed and maximised column indices on ``device``, copied there once (a copy from
    host memory inside a measured step would be a host sync)."""
    if device not in _COLUMNS:
        _COLUMNS[device] = (
            torch.as_tensor(layout.SUM_COLUMNS, device=device),
            torch.as_tensor(layout.MAX_COLUMNS, device=device),
        )
    return _COLUMNS[device]


class HostRows:
    """Rows of one step, computed by a CPU kernel when the hook runs (large activations on
    every core: autograd is not running while a forward hook is).

    Args:
        count: rows (``2 * M``).
        kernel: the CPU kernel (``"numba"`` or ``"numpy"``).
    """

    def __init__(self, count: int, kernel: str) -> None:
        self.kernel = kernel
        self.rows = np.zeros((count, layout.ROW_WIDTH))
        self.first_bad = np.full(count, -1, dtype=np.int64)

    def add(self, index: int, seq: int, tensors: Sequence[torch.Tensor]) -> None:
        """Measure ``tensors`` (one call's) into row ``index``."""
        measured = host_backend.host_rows(tensors, self.kernel)
        self.combine(index, seq, layout.combine_rows(measured))

    def combine(self, index: int, seq: int, row: np.ndarray) -> None:
        """Combine an already measured row (e.g. a copy of another row) into row ``index``."""
        self.rows[index] = layout.combine_rows(np.stack([self.rows[index], row]))
        if self.first_bad[index] < 0 and row[layout.NANS] + row[layout.INFS] > 0:
            self.first_bad[index] = seq

    def row(self, index: int) -> np.ndarray:
        return self.rows[index].copy()

    def finish(self) -> None:
        pass

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, first_bad)``: float64 ``(count, ROW_WIDTH)`` and int64 ``(count,)``."""
        return self.rows, self.first_bad


class DeviceRows:
    """Rows of one step in a device buffer, computed by the Triton kernels (module docstring).

    Args:
        device: a CUDA device, or CPU when the kernels are interpreted.
        count: rows (``2 * M``).
    """

    def __init__(self, device: torch.device, count: int) -> None:
        self.device = device
        self.rows = torch.zeros((count, layout.ROW_WIDTH + 1), dtype=torch.float64, device=device)
        self.rows[:, SEQ] = -1
        self._scratch = torch.empty((8, layout.ROW_WIDTH), dtype=torch.float64, device=device)
        self._sum, self._max = _columns(device)
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None

    def add(self, index: int, seq: int, tensors: Sequence[torch.Tensor]) -> None:
        """Launch the kernel for ``tensors`` and combine the result into row ``index``."""
        flats = [flat_elements(t) for t in tensors]
        if len(flats) > self._scratch.shape[0]:
            self._scratch = torch.empty((2 * len(flats), layout.ROW_WIDTH), dtype=torch.float64, device=self.device)
        part = self._scratch[: len(flats)]
        triton_backend.launch_rows(flats, part, range(len(flats)))
        self._combine(index, seq, part)

    def combine(self, index: int, seq: int, row: torch.Tensor) -> None:
        """Combine a measured row (float64 ``(ROW_WIDTH,)`` on the device) into row ``index``."""
        self._combine(index, seq, row[None, : layout.ROW_WIDTH])

    def _combine(self, index: int, seq: int, part: torch.Tensor) -> None:
        # Device operations only, on the current stream: the host never waits here.
        target = self.rows[index]
        target[self._sum] += part.index_select(1, self._sum).sum(0)
        target[self._max] = torch.maximum(target[self._max], part.index_select(1, self._max).amax(0))
        bad = (part[:, layout.NANS] + part[:, layout.INFS]).sum() > 0
        first = target[SEQ]
        target[SEQ] = torch.where(bad & (first < 0), first.new_full((), float(seq)), first)

    def row(self, index: int) -> torch.Tensor:
        """A copy of row ``index`` so far (on the device)."""
        return self.rows[index].clone()

    def finish(self) -> None:
        """Start the copy to the host (CUDA: pinned memory and an event; no wait)."""
        if self.device.type != "cuda":
            self._host = self.rows
            return
        self._host = torch.empty(self.rows.shape, dtype=torch.float64, pin_memory=True)
        self._host.copy_(self.rows, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(self.device))

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, first_bad)`` once :meth:`done` (see :meth:`HostRows.result`)."""
        host = self._host.numpy()
        return host[:, : layout.ROW_WIDTH].copy(), host[:, SEQ].astype(np.int64)


class ForwardStep:
    """A closed sampled step's forward rows on their way to the host (no host sync).

    Args:
        step: the sampled step.
        engines: engine -> :class:`HostRows`/:class:`DeviceRows` that measured it.
        first: int64 ``(2 * M)``, sequence position of each row's first call (-1: absent).
        dtypes, autocast: as in :class:`gradscope.run.records.Forward`.
        combiner: combines the rows across ranks (every rank must pass one at every
            sampled step, whatever it measured), or None.
        failed: this rank could not measure the step (with a combiner: voids it everywhere).
    """

    def __init__(
        self,
        step: int,
        engines: dict,
        first: np.ndarray,
        dtypes: tuple[str, ...],
        autocast: str,
        combiner: RankRows | None = None,
        failed: bool = False,
    ) -> None:
        self.step, self._engines, self._first = step, engines, first
        self._dtypes, self._autocast, self._combiner = dtypes, autocast, combiner
        self._works: list = []
        self._event: torch.cuda.Event | None = None
        self._host: torch.Tensor | None = None
        if combiner is None:
            for engine in engines.values():
                engine.finish()
            return
        rows, first_bad = self._local_rows(combiner.device, len(first))
        wire, self._works = combiner.issue(rows, first_bad, failed=failed)
        if combiner.device.type == "cuda":
            self._host = torch.empty(wire.shape, dtype=torch.float64, pin_memory=True)
            self._host.copy_(wire, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(combiner.device))
        else:
            self._host = wire

    def _local_rows(self, device: torch.device, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._engines:
            rows = torch.zeros((count, layout.ROW_WIDTH), dtype=torch.float64, device=device)
            return rows, torch.full((count,), -1.0, dtype=torch.float64, device=device)
        if len(self._engines) > 1:
            raise ValueError("gradscope: forward statistics of a distributed run must come from one device")
        (engine,) = self._engines.values()
        if isinstance(engine, DeviceRows):
            return engine.rows[:, : layout.ROW_WIDTH], engine.rows[:, SEQ]
        rows = torch.from_numpy(engine.rows).to(device)
        return rows, torch.from_numpy(engine.first_bad.astype(np.float64)).to(device)

    def done(self) -> bool:
        if self._combiner is not None:
            return works_done(self._works) and (self._event is None or self._event.query())
        return all(engine.done() for engine in self._engines.values())

    def wait(self) -> None:
        wait_all(self._works)
        if self._event is not None:
            self._event.synchronize()
        for engine in self._engines.values():
            engine.wait()

    def record(self) -> records.Forward | None:
        """The step's record once :meth:`done` (None when a rank could not measure it)."""
        count = len(self._first)
        rank = None
        if self._combiner is not None:
            combined = self._combiner.decode(self._host.numpy())
            if combined is None:
                return None
            rows, first_bad, rank = combined.rows, combined.first_bad, combined.nonfinite_rank.reshape(2, -1)
        else:
            results = [engine.result() for engine in self._engines.values()]
            if len(results) == 1:
                rows, first_bad = results[0]
            else:  # parameters on several devices: combine on the host
                rows = layout.combine_rows(np.stack([r for r, _ in results]))
                bad = np.stack([b for _, b in results])
                first_bad = np.where(bad >= 0, bad, np.iinfo(np.int64).max).min(axis=0)
                first_bad[first_bad == np.iinfo(np.int64).max] = -1
        order = np.where(first_bad >= 0, first_bad, self._first).reshape(2, count // 2)
        # A row no rank measured here but another rank did: present, position unknown locally.
        order = np.where((order < 0) & (rows[:, layout.NUMEL].reshape(2, -1) > 0), np.iinfo(np.int32).max, order)
        both = rows.reshape(2, count // 2, layout.ROW_WIDTH)
        return records.Forward(self.step, both[1], both[0], order, self._dtypes, self._autocast, rank)
