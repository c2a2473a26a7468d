"""Capture engines: where a monitor's gradient statistics are computed, per device.

A capture owns one statistics row per watched parameter on its device and fills them for
sampled steps:

* :class:`KernelCapture` launches the Triton kernel (CUDA, or CPU tensors in Triton's
  interpreter). Gradients are launched in buckets as hooks deliver them, on the current
  stream, into a device buffer; at the end of the step the buffer is copied to pinned host
  memory with ``non_blocking=True`` and a CUDA event marks when it has landed. Nothing here
  waits for the device; the host collects a step once its event has completed (or when it
  is asked to, and then it waits). A small pool of buffers lets the host fall a few steps
  behind.
* :class:`HostCapture` runs a CPU kernel (:mod:`gradscope.stats.host_backend`). Gradients
  are gathered and measured together, small ones packed into one buffer, on all cores when
  backward ends. In backward mode, when the machine has cores that autograd does not use
  (``torch.set_num_threads(1)``, as ``torchrun`` sets it), large gradients (at least
  :data:`HAND_OVER_FROM` elements) are measured on a worker thread as they arrive,
  overlapping autograd; the worker takes whatever has queued up in one call. Small ones
  stay gathered even then: measuring one costs far more in Python, holding the GIL that
  the training thread's hooks need, than in the kernel, which releases it.
  Either way the end of backward waits for the measurements, so that no gradient is still
  being read when user code may modify it (clipping, unscaling).

Both compute each gradient's row with the same deterministic code whichever other
gradients share a launch, so backward mode and step mode give identical numbers.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gradscope.distributed.collectives import wait_all, works_done
from gradscope.distributed.sharded import CombinedRows, ShardedRows
from gradscope.stats import host_backend, layout, triton_backend
from gradscope.stats.inputs import FlatElements, add_implicit_zeros, flat_elements

BUCKET_TENSORS = 64
"""Gradients per kernel launch in backward mode (fewer launches, still overlapping backward)."""

BUCKET_NUMEL = 1 << 25
"""Elements per kernel launch in backward mode."""

HAND_OVER_FROM = 1 << 17
"""Gradients with at least this many elements go to a CPU capture's worker as they arrive.
Measured on a 2-core machine: a call into the CPU backend costs ~60 us of Python (holding
the GIL) whatever it measures, and its kernel (which releases the GIL) takes about as long
for 2**17 float32 elements; smaller gradients are cheaper measured together at the end of
backward than handed over one by one."""

MAX_SLOTS = 8
"""Sampled steps whose device buffers may be in flight before the host waits for the oldest."""


@dataclass
class _Slot:
    rows: torch.Tensor  # device, float64 (count, ROW_WIDTH)
    host: torch.Tensor  # pinned (CUDA) or the same tensor (CPU); the wire buffer's copy when combined
    event: torch.cuda.Event | None
    implicit_zeros: np.ndarray  # (count,) unstored zeros of sparse gradients, added on the host
    works: list  # collectives still running (CPU process groups)


Completed = tuple[int, "np.ndarray | CombinedRows | None"]
"""A finished sampled step: its rows (float64 ``(count, ROW_WIDTH)``), or with a combiner the
rows combined across ranks, or None when a rank failed to measure it."""


class KernelCapture:
    """Statistics of the gradients on one device, by the Triton kernel (see module docstring).

    Args:
        device: a CUDA device, or CPU when the kernels are interpreted.
        count: rows (watched parameters on this device).
        combiner: combines the rows across ranks (sharded gradients) before they go to the host.
    """

    def __init__(self, device: torch.device, count: int, combiner: ShardedRows | None = None) -> None:
        self.device = device
        self.count = count
        self.combiner = combiner
        self.zero_rows = combiner is not None  # rows of absent parameters must read as zeros
        self._free: list[_Slot] = []
        self._slots = 0
        self._in_flight: deque[tuple[int, _Slot]] = deque()
        self._done: list[Completed] = []
        self._slot: _Slot | None = None
        self._inv_scale: torch.Tensor | None = None
        self._histogram = True
        self._pending: list[tuple[int, FlatElements]] = []
        self._pending_numel = 0

    def _take_slot(self) -> _Slot:
        if not self._free and self._slots >= MAX_SLOTS and self._in_flight:
            oldest = self._in_flight[0][1]
            if oldest.event is not None:  # the host is MAX_SLOTS sampled steps behind: wait
                oldest.event.synchronize()
            wait_all(oldest.works)
            self._release_done()
        if self._free:
            return self._free.pop()
        self._slots += 1
        rows = torch.empty((self.count, layout.ROW_WIDTH), dtype=torch.float64, device=self.device)
        zeros = np.zeros(self.count)
        if self.device.type == "cuda":
            shape = rows.shape if self.combiner is None else (self.combiner.numel,)
            host = torch.empty(shape, dtype=torch.float64, pin_memory=True)
            return _Slot(rows, host, torch.cuda.Event(), zeros, [])
        return _Slot(rows, rows, None, zeros, [])

    def start(self, inv_scale: torch.Tensor | None, histogram: bool = True) -> None:
        """Begin capturing a sampled step; ``inv_scale`` (float32 [1] on this device) unscales;
        without ``histogram``, light rows (the kernel computes the histograms that trigger)."""
        self._slot = self._take_slot()
        self._slot.implicit_zeros[:] = 0
        if self.zero_rows:
            self._slot.rows.zero_()  # rows of parameters without a gradient must add nothing
        self._inv_scale = inv_scale
        self._histogram = histogram
        self._pending.clear()
        self._pending_numel = 0

    def add(self, index: int, grad: torch.Tensor) -> None:
        """Queue row ``index``'s final gradient; launches when a bucket is full."""
        flat = flat_elements(grad)
        self._pending.append((index, flat))
        self._pending_numel += flat.values.numel()
        if len(self._pending) >= BUCKET_TENSORS or self._pending_numel >= BUCKET_NUMEL:
            self.flush()

    def add_all(self, indices: Sequence[int], grads: Sequence[torch.Tensor]) -> None:
        """Step mode: every gradient at once (one launch per dtype)."""
        self._pending.extend((i, flat_elements(g)) for i, g in zip(indices, grads, strict=True))
        self.flush()

    def flush(self) -> None:
        """Launch whatever is queued (on the current stream; no host sync)."""
        if not self._pending:
            return
        indices = [i for i, _ in self._pending]
        flats = [f for _, f in self._pending]
        self._pending.clear()
        self._pending_numel = 0
        triton_backend.launch_rows(
            flats, self._slot.rows, indices, inv_scale=self._inv_scale, histogram=self._histogram
        )
        for i, flat in zip(indices, flats, strict=True):
            self._slot.implicit_zeros[i] = flat.implicit_zeros

    end_backward = flush

    def device_rows(self) -> torch.Tensor:
        """The open step's rows so far (float64 ``(count, ROW_WIDTH)`` on the device), after
        launching what is queued; no host sync."""
        self.flush()
        return self._slot.rows

    def finish(self, step: int, failed: bool = False) -> None:
        """End the step: launch the rest and start the copy of its rows to the host.

        With a combiner the rows are combined across ranks first; every rank issues those
        collectives even when it ``failed`` to measure the step (or fails here), so that no
        rank is left waiting.
        """
        error = None
        try:
            self.flush()
        except Exception as caught:
            error = caught
        slot, self._slot = self._slot, None
        source = slot.rows
        if self.combiner is not None:
            if slot.implicit_zeros.any():
                add_implicit_zeros(slot.rows, torch.tensor(slot.implicit_zeros, dtype=torch.float64).to(self.device))
                slot.implicit_zeros[:] = 0
            source, slot.works = self.combiner.issue(slot.rows, failed=failed or error is not None)
            if slot.event is None:
                slot.host = source
        if slot.event is not None:
            slot.host.copy_(source, non_blocking=True)
            slot.event.record(torch.cuda.current_stream(self.device))
        self._in_flight.append((step, slot))
        if error is not None:
            raise error

    def _release_done(self) -> None:
        while self._in_flight:
            step, slot = self._in_flight[0]
            if slot.event is not None and not slot.event.query():
                break
            if not works_done(slot.works):
                break
            self._in_flight.popleft()
            if self.combiner is not None:
                slot.works = []
                self._done.append((step, self.combiner.decode(slot.host.numpy())))
            else:
                self._done.append((step, add_implicit_zeros(slot.host.numpy().copy(), slot.implicit_zeros)))
            self._free.append(slot)

    def completed(self, block: bool = False) -> list[Completed]:
        """Finished steps, oldest first (see :data:`Completed`); with ``block``, waits for
        every step in flight."""
        if block and self._in_flight:
            if self._in_flight[-1][1].event is not None:
                self._in_flight[-1][1].event.synchronize()
            for _, slot in self._in_flight:
                wait_all(slot.works)
        self._release_done()
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        self._free.clear()
        self._in_flight.clear()
        self._done.clear()
        self._pending.clear()
        self._slot = None


class HostCapture:
    """Statistics of gradients by a CPU kernel (see module docstring).

    Args:
        count: rows (watched parameters read by this capture).
        kernel: ``"numba"`` or ``"numpy"``.
        overlap: in backward mode, measure each large gradient (:meth:`takes_at_once`) on a
            worker thread as soon as it arrives, overlapping autograd. Other gradients are
            gathered and measured together, on every core, when backward ends (or at
            ``mon.step()``).
        combiner: combines the rows across ranks (sharded gradients on CPU, gloo).
    """

    def __init__(self, count: int, kernel: str, overlap: bool, combiner: ShardedRows | None = None) -> None:
        self.count = count
        self.kernel = kernel
        self.overlap = overlap
        self.combiner = combiner
        self._rows: np.ndarray | None = None
        self._inv_scale: float | None = None
        self._histogram = True
        self._indices: list[int] = []  # gathered gradients, measured when backward ends
        self._grads: list[torch.Tensor] = []
        self._done: list[tuple[int, np.ndarray]] = []
        self._combining: deque[tuple[int, torch.Tensor, list]] = deque()
        self._tasks: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, inv_scale: float | None, histogram: bool = True) -> None:
        """Begin a sampled step (see :meth:`KernelCapture.start`)."""
        self._rows = np.zeros((self.count, layout.ROW_WIDTH))
        self._inv_scale = inv_scale
        self._histogram = histogram
        self._indices.clear()
        self._grads.clear()

    def _compute(self, indices: Sequence[int], grads: Sequence[torch.Tensor], num_threads: int | None) -> None:
        try:
            rows = host_backend.host_rows(
                grads, self.kernel, num_threads=num_threads, inv_scale=self._inv_scale, histogram=self._histogram
            )
            self._rows[indices] = rows
        except BaseException as error:  # reported by the monitor; training goes on
            self.error = error

    def _work(self) -> None:
        """The worker: measures, in one call on one thread, every gradient queued since it last
        looked (fewer calls when gradients arrive faster than it measures them)."""
        while True:
            tasks = [self._tasks.get()]
            while True:
                try:
                    tasks.append(self._tasks.get_nowait())
                except queue.Empty:
                    break
            try:
                work = [task for task in tasks if task is not None]
                if work:
                    self._compute([index for index, _ in work], [grad for _, grad in work], num_threads=1)
            finally:
                for _ in tasks:
                    self._tasks.task_done()
            if None in tasks:
                return

    def takes_at_once(self, numel: int) -> bool:
        """True when a gradient of ``numel`` elements is measured on the worker as soon as it
        is handed over (:data:`HAND_OVER_FROM`); others are measured when backward ends."""
        return self.overlap and numel >= HAND_OVER_FROM

    def add(self, index: int, grad: torch.Tensor) -> None:
        """Row ``index``'s final gradient: queued for the worker (:meth:`takes_at_once`), else
        gathered."""
        if not self.takes_at_once(grad.numel()):
            self._indices.append(index)
            self._grads.append(grad)
            return
        if self._worker is None:
            self._tasks = queue.Queue()
            self._worker = threading.Thread(target=self._work, name="gradscope-capture", daemon=True)
            self._worker.start()
        self._tasks.put((index, grad))

    def add_all(self, indices: Sequence[int], grads: Sequence[torch.Tensor]) -> None:
        """These rows' final gradients, measured now with those gathered (none goes to the worker)."""
        self._indices.extend(indices)
        self._grads.extend(grads)
        self.end_backward()

    def end_backward(self) -> None:
        """Measure what was gathered (while the worker finishes what it was handed), and wait
        until every gradient handed over has been read."""
        if self._indices:
            self._compute(self._indices, self._grads, num_threads=None)
            self._indices.clear()
            self._grads.clear()
        if self._tasks is not None:
            self._tasks.join()

    def device_rows(self) -> torch.Tensor:
        """The open step's rows (float64 ``(count, ROW_WIDTH)``, CPU), once measured."""
        self.end_backward()
        return torch.from_numpy(self._rows)

    def finish(self, step: int, failed: bool = False) -> None:
        """End the step (with a combiner, every rank issues its collectives, even one that
        ``failed`` to measure the step; see :meth:`KernelCapture.finish`)."""
        error = None
        try:
            self.end_backward()
        except Exception as caught:
            error = caught
        rows, self._rows = self._rows, None
        if self.combiner is None:
            self._done.append((step, rows))
        else:
            failed = failed or error is not None or self.error is not None
            wire, works = self.combiner.issue(torch.from_numpy(rows), failed=failed)
            self._combining.append((step, wire, works))
        if error is not None:
            raise error

    def completed(self, block: bool = False) -> list[Completed]:
        while self._combining:
            step, wire, works = self._combining[0]
            if block:
                wait_all(works)
            elif not works_done(works):
                break
            self._combining.popleft()
            self._done.append((step, self.combiner.decode(wire.numpy())))
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        if self._worker is not None:
            self._tasks.put(None)
            self._worker.join()
            self._worker = None
        self._done.clear()
        self._indices.clear()
        self._grads.clear()
        self._combining.clear()
