"""The cost side of a training step — time, memory, energy — and what the run is.

:class:`StepClock` records, at every ``mon.step()``, the step's scalar values (loss,
GradScaler scale, metrics), its duration, the peak memory so far and the GPU energy used
since the previous step (when NVML is available). On CUDA, tensor values are copied to
pinned host memory with ``non_blocking=True`` and the duration is measured between CUDA
events, so a step costs no host synchronisation; values are read once the step's event has
completed. :func:`describe_run` says what the run is: its rows, the model's size, the
monitor's settings and the versions it ran with (the run log's header).
"""

from __future__ import annotations

import datetime
import queue
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gradscope.distributed.pipeline import PipelinePlace
from gradscope.distributed.topology import Topology
from gradscope.monitor.siblings import sibling_groups
from gradscope.monitor.watched import WatchedParams
from gradscope.run.history import BUILT_IN_FIELDS
from gradscope.run.info import RunInfo, package_version

RING = 256
"""Steps whose values may be in flight to the host before the clock waits for the oldest."""

HOST_MEMORY_EVERY_S = 1.0
"""On CPU the peak memory (the process's max RSS, a system call) is read at most this often;
steps in between carry the last reading (a peak only grows: a reading is a lower bound that
is at most this many seconds old). A system call per step cost 20-50 µs after backward."""


def peak_memory(device: torch.device) -> float:
    """Peak memory so far in bytes: the CUDA allocator's peak on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        # torch.cuda.max_memory_allocated flattens every allocator statistic into a sorted
        # dict first (~0.5 ms per call); the nested dict holds the same number.
        stats = torch.cuda.memory_stats_as_nested_dict(device)
        return float(stats.get("allocated_bytes", {}).get("all", {}).get("peak", 0))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss if sys.platform == "darwin" else rss * 1024)


ENERGY_WORKER_IDLE_S = 2.0
"""Seconds without a request after which the energy reader's thread ends (it restarts on
the next request), so that a finished monitor leaves no thread behind."""

ENERGY_WAIT_S = 10.0
"""Longest wait for one reading; a counter that takes longer is given up (energy reads NaN
from then on) rather than holding up training or a report."""


class EnergyMeter:
    """Total energy of a GPU in joules through NVML, if ``pynvml`` (nvidia-ml-py) is importable.

    Reading the counter can be slow: 5 ms per read through NVML on an H200 virtual machine,
    measured, which at every step was a sixth of a GPT-2 step. So readings are taken on a
    worker thread: :meth:`mark` asks for a reading and returns at once, :meth:`take` gives it
    once taken (the read releases the GIL, so training goes on meanwhile).

    Args:
        device: the GPU whose counter is read (no counter for other devices).
        counter: a function returning the counter in joules, instead of NVML's.
    """

    def __init__(self, device: torch.device, counter: Callable[[], float] | None = None) -> None:
        self._counter = counter
        if counter is None and device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                read = pynvml.nvmlDeviceGetTotalEnergyConsumption
                read(handle)
                self._counter = lambda: read(handle) / 1000.0  # millijoules
            except Exception:  # no NVML, no GPU access, or a GPU without energy counters
                self._counter = None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._readings: dict = {}
        self._lock = threading.Condition()
        self._worker: threading.Thread | None = None

    @property
    def available(self) -> bool:
        """Whether the GPU's energy counter can be read."""
        return self._counter is not None

    def joules(self) -> float:
        """The counter now, read on this thread (NaN when unavailable)."""
        if self._counter is None:
            return float("nan")
        try:
            return float(self._counter())
        except Exception:
            return float("nan")

    def mark(self, key) -> None:
        """Ask for a reading of the counter, filed under ``key``; returns at once."""
        if self._counter is None:
            return
        self._requests.put(key)
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="gradscope-energy", daemon=True)
                self._worker.start()

    def take(self, key, wait: bool = False) -> float | None:
        """The reading filed under ``key`` (removed), None if not taken yet and not ``wait``.

        A reading not taken within :data:`ENERGY_WAIT_S` when waiting gives NaN, and the
        counter is given up: :attr:`available` turns False.
        """
        with self._lock:
            if wait and not self._lock.wait_for(lambda: key in self._readings, timeout=ENERGY_WAIT_S):
                self._counter = None  # a counter this slow is not worth waiting for again
                return float("nan")
            return self._readings.pop(key, None)

    def _serve(self) -> None:
        while True:
            try:
                key = self._requests.get(timeout=ENERGY_WORKER_IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._requests.empty():
                        self._worker = None
                        return
                continue
            value = self.joules()
            with self._lock:
                self._readings[key] = value
                self._lock.notify_all()


@dataclass
class StepRecord:
    """What the clock measured for one step (NaN where unknown)."""

    step: int
    step_time: float
    peak_memory: float
    energy: float
    values: dict[str, float]  # loss, grad_scale and step metrics


def check_metric_names(metrics: dict) -> None:
    """A metric may not take the name of a field gradscope records itself (it would hide it)."""
    if not metrics:
        return
    taken = sorted(BUILT_IN_FIELDS.intersection(metrics))
    if taken:
        names = ", ".join(map(repr, taken))
        raise ValueError(f"gradscope: {names} is gradscope's own history field; name the metric otherwise")


def as_scalar(value, what: str) -> torch.Tensor | float:
    """A metric as a float, or as a detached 0-d tensor if it lives on a device (read later,
    without a sync); raises for anything else. A CPU tensor is read at once: it is computed
    already, and reading it now costs less than keeping it."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"gradscope: {what} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.device.type == "cpu":
            return value.item()
        return value.detach().reshape(())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"gradscope: {what} must be a number or a one-element tensor, got {type(value).__name__}"
        ) from None


class StepClock:
    """Per-step values (loss, scale, metrics), time, memory and energy, with no host sync.

    Args:
        device: where the model's computation runs (CUDA events are used on a CUDA device).
    """

    def __init__(self, device: torch.device, energy: EnergyMeter | None = None) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._energy = energy or EnergyMeter(device)
        self._last_energy = self._energy.joules()
        self._ticks = 0
        self._done: list[StepRecord] = []
        self._in_flight: deque = deque()
        if self._cuda:
            self._last_event = torch.cuda.Event(enable_timing=True)
            self._last_event.record(torch.cuda.current_stream(device))
        else:
            self._last_time = time.perf_counter()
            self._memory, self._memory_read_at = float("nan"), -float("inf")

    def tick(self, step: int, values: dict[str, torch.Tensor | float]) -> None:
        """Close ``step`` with its scalar values (0-d tensors on any device, or floats)."""
        if not self._cuda:
            now = time.perf_counter()
            if now - self._memory_read_at >= HOST_MEMORY_EVERY_S:
                self._memory, self._memory_read_at = peak_memory(self.device), now
            memory = self._memory
            energy_now = self._energy.joules()
            energy, self._last_energy = energy_now - self._last_energy, energy_now
            elapsed, self._last_time = now - self._last_time, now
            read = {name: _host_float(value) for name, value in values.items()}
            self._done.append(StepRecord(step, elapsed, memory, energy, read))
            return
        memory = peak_memory(self.device)
        names = list(values)
        self._ticks += 1
        energy = self._ticks  # the key of this step's energy reading, taken off this thread
        self._energy.mark(energy)
        if len(self._in_flight) >= RING:  # the host is RING steps behind the device
            self._in_flight[0][1].synchronize()
            self._collect(block=True)
        host = torch.empty(len(names), dtype=torch.float64, pin_memory=True)
        for i, value in enumerate(values.values()):
            if isinstance(value, torch.Tensor):
                host[i].copy_(value, non_blocking=True)  # lands before the event below
            else:
                host[i] = value
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        self._in_flight.append((step, event, self._last_event, memory, energy, names, host))
        self._last_event = event

    def _collect(self, block: bool = False) -> None:
        while self._in_flight and self._in_flight[0][1].query():
            step, event, previous, memory, key, names, host = self._in_flight[0]
            energy = float("nan")
            if self._energy.available:
                reading = self._energy.take(key, wait=block)
                if reading is None:  # not read yet: this step waits for the next collection
                    return
                energy, self._last_energy = reading - self._last_energy, reading
            self._in_flight.popleft()
            seconds = previous.elapsed_time(event) / 1000.0
            self._done.append(StepRecord(step, seconds, memory, energy, dict(zip(names, host.tolist(), strict=True))))

    def completed(self, block: bool = False, at_least: int = 1) -> list[StepRecord]:
        """Records of steps whose values have reached the host, oldest first; none until
        ``at_least`` have (unless ``block``), so that a caller can take them in batches."""
        if self._cuda:
            if block and self._in_flight:
                self._in_flight[-1][1].synchronize()
            self._collect(block)
        if len(self._done) < at_least and not block:
            return []
        done, self._done = self._done, []
        return done


def _host_float(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.item())
    return float(value)


def model_summary(model: torch.nn.Module, rows: int) -> dict:
    """Parameter count, trainable count, bytes and row count (parameters counted once)."""
    params = list(model.parameters())
    return {
        "parameters": int(sum(p.numel() for p in params)),
        "trainable": int(sum(p.numel() for p in params if p.requires_grad)),
        "bytes": int(sum(p.numel() * p.element_size() for p in params)),
        "layers": rows,
    }


def row_dtypes(watched: WatchedParams) -> tuple[str, ...]:
    """Each row's gradient dtype: the least precise among its parameters (fewest mantissa bits)."""
    chosen: dict[int, torch.dtype] = {}
    for row, param in zip(watched.row_of, watched.params, strict=True):
        dtype, row = param.dtype, int(row)
        if row not in chosen or (dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(chosen[row]).eps):
            chosen[row] = dtype
    return tuple(str(chosen[r]).removeprefix("torch.") for r in range(len(watched.row_names)))


def describe_run(
    target: torch.nn.Module,
    options,
    watched: WatchedParams,
    topology: Topology,
    modules: Sequence[tuple[str, torch.nn.Module]] = (),
    stage: PipelinePlace | None = None,
) -> RunInfo:
    """The :class:`~gradscope.run.info.RunInfo` of a monitor of ``target`` (the unwrapped model)
    with ``options`` (its :class:`~gradscope.monitor.options.WatchOptions`); ``modules``: the
    named modules of its forward statistics, if any
    (:func:`gradscope.monitor.forward.forward_modules`); ``stage``: where a pipeline stage
    stands (kept as ``extra["pipeline"]``, which joins the stages' logs into one run)."""
    row_numel = np.bincount(watched.row_of, weights=watched.numel, minlength=len(watched.row_names))
    extra = {
        "gradscope": package_version(),
        "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if topology.kind != "single" or topology.world > 1:
        extra["distributed"] = topology.to_dict()
    if stage is not None:
        extra["pipeline"] = stage.to_dict()
    return RunInfo(
        rows=watched.row_names,
        row_types=watched.row_types,
        summary=model_summary(target, len(watched.row_names)),
        every=options.every,
        mode=options.mode,
        granularity=options.granularity,
        history=options.history,
        hist_history=options.hist_history,
        history_mib=options.history_mib,
        track_updates=options.track_updates,
        row_numel=tuple(int(n) for n in row_numel),
        extra=extra,
        row_dtypes=row_dtypes(watched),
        modules=tuple(name for name, _ in modules),
        module_types=tuple(type(module).__name__ for _, module in modules),
        histogram_every=options.histogram_every,
        sibling_groups=sibling_groups(target, watched),
        tags=dict(options.tags),
    )
