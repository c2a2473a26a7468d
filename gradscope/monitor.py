"""``gradscope.watch``: per-layer gradient statistics captured during training, no host sync.

::

    mon = gradscope.watch(model)
    for batch in data:
        loss = model(batch).loss
        loss.backward()
        mon.step(loss=loss)          # end of one optimisation step; loss stays on the device
        opt.step(); opt.zero_grad()
    mon.history("norm")              # (steps, layers) NumPy array, steps and layer names

In ``mode="backward"`` (the default) a ``register_post_accumulate_grad_hook`` on every
watched parameter hands its gradient to a capture engine (:mod:`gradscope.capture`) as soon
as it is final: on CUDA the Triton kernel is launched on the current stream while the rest
of backward runs; on CPU a worker thread runs NumPy while autograd goes on, and the end of
backward waits for it. In ``mode="step"`` everything is measured in one pass at
``mon.step()``. Both give identical numbers.

Statistics land in device buffers and reach the host through pinned memory and CUDA events;
the host reads a step once its event has completed (usually one step later) or when asked
(``history()``, ``stats()``, ``close()``), and only then waits.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from gradscope import distributed, layout, records
from gradscope.backends import numpy_backend, triton_backend
from gradscope.capture import KernelCapture, NumpyCapture
from gradscope.distributed import CombinedRows, ShardedRows
from gradscope.exporters import Exporter
from gradscope.history import Series
from gradscope.noise_scale import NoiseScale
from gradscope.pump import RecordPump
from gradscope.replicas import ReplicaCheck, install_hook
from gradscope.report import HealthReport
from gradscope.resources import StepClock, as_scalar, model_summary
from gradscope.run import RunInfo, RunState
from gradscope.runlog import RunLog
from gradscope.tensor_stats import TensorStats
from gradscope.thresholds import Thresholds
from gradscope.updates import UpdateTracker
from gradscope.watched import ParamSelector, find_ddp, select, untracked, unwrap

MODES = ("backward", "step")
_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> weakref(Monitor)
_MAX_ERRORS = 100
_CHECK_NEW_PARAMS_EVERY = 100  # steps between checks for parameters added after watch()
_NO_ORDER = np.iinfo(np.int64).max


def watch(
    model: torch.nn.Module,
    every: int = 1,
    mode: str = "backward",
    accumulation_steps: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    scaler=None,
    track_updates: bool = False,
    history: int = 10_000,
    *,
    granularity: str = "layer",
    params: ParamSelector = None,
    backend: str = "auto",
    hist_history: int = 1_000,
    thresholds: Thresholds | None = None,
    log_dir: str | os.PathLike | None = None,
    exporters: Sequence[Exporter] = (),
    log_rank: int | None = 0,
    check_consistency: bool = False,
    comm_hook: bool = True,
    batch_size: int | None = None,
    noise_scale_decay: float = 0.95,
) -> Monitor:
    """Start monitoring ``model``'s gradients; returns the :class:`Monitor`.

    Args:
        model: the model (a ``torch.compile`` wrapper is fine: its parameters are watched).
        every: sample steps 0, every, 2*every, ...; on other steps the hooks return at once.
        mode: ``"backward"`` (measure each gradient as soon as it is final, overlapping
            backward) or ``"step"`` (measure all gradients at ``mon.step()``).
        accumulation_steps: backward passes per optimisation step; gradients are measured
            after the last one, when they are complete (backward mode).
        optimizer: needed for ``track_updates``; also tells a ``scaler`` which optimizer's
            gradients may already be unscaled.
        scaler: a ``torch.amp.GradScaler``; statistics are then of the unscaled gradients
            (``g * inv_scale`` as the scaler computes it), and steps it skips for overflow
            show as ``skipped`` in the history.
        track_updates: record per-layer weight norm, update norm ``||w_after - w_before||``
            and their ratio on sampled steps (costs one copy of the watched parameters).
        history: sampled steps kept in memory (oldest dropped).
        granularity: ``"layer"`` (rows are modules) or ``"parameter"`` (rows are parameters).
        params: which parameters: names or glob patterns, or a predicate ``(name, param)``.
        backend: ``"auto"``, ``"triton"`` or ``"numpy"`` (as in :func:`gradscope.grad_stats`).
        hist_history: sampled steps whose histograms are kept (the newest).
        thresholds: the health checks' :class:`gradscope.Thresholds` for :meth:`Monitor.report`.
        log_dir: a new directory for the run log (JSON Lines, read back with
            :func:`gradscope.load_run`), written off the training thread.
        exporters: more destinations for the run's records, e.g.
            ``[gradscope.exporters.TensorBoardExporter("runs/tb")]``.
        log_rank: in a distributed run, the (global) rank that writes the run log, feeds
            the exporters and warns; the others stay silent (every rank still has the
            same history and report). None: every rank logs, into ``log_dir/rank-NNNNN``.
        check_consistency: DDP only: compare the ranks' averaged gradients at every
            sampled step (one small collective) and report ranks that disagree as a
            critical ``rank_desync`` finding.
        comm_hook: DDP only: register gradscope's communication hook (DDP's averaging plus
            one norm per bucket before and after it, on sampled steps) for the gradient
            noise scale and the rank a non-finite gradient came from. Skipped, with a
            warning, when the model already has a hook.
        batch_size: DDP: examples per rank per optimisation step, to express the noise
            scale in examples (None: in per-rank batches).
        noise_scale_decay: DDP: decay of the noise scale's moving averages, per sampled step.

    Distributed runs (see :mod:`gradscope.distributed`): with DDP the statistics are those of
    the averaged gradient, measured when DDP has finished averaging; with sharded (DTensor,
    FSDP2) parameters each rank measures its shard and two asynchronous all-reduces per
    sampled step combine them, so every rank reports the numbers of the whole gradient.
    Every rank must call ``watch()`` and ``mon.step()`` alike.

    Raises:
        RuntimeError: ``model`` is already watched by a monitor that is not closed.
        ValueError / TypeError: an invalid argument (named in the message).
    """
    return Monitor(
        model,
        every=every,
        mode=mode,
        accumulation_steps=accumulation_steps,
        optimizer=optimizer,
        scaler=scaler,
        track_updates=track_updates,
        history=history,
        granularity=granularity,
        params=params,
        backend=backend,
        hist_history=hist_history,
        thresholds=thresholds,
        log_dir=log_dir,
        exporters=exporters,
        log_rank=log_rank,
        check_consistency=check_consistency,
        comm_hook=comm_hook,
        batch_size=batch_size,
        noise_scale_decay=noise_scale_decay,
    )


def _version() -> str:
    from gradscope import __version__

    return __version__


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"watch: {name} must be a positive integer, got {value!r}")
    return value


def _spare_cores() -> bool:
    """True when autograd (torch's intra-op threads) leaves CPU cores idle for a NumPy worker."""
    return numpy_backend.default_num_threads() > torch.get_num_threads()


def _queue_end_of_backward(callback: Callable[[], None]) -> bool:
    """Run ``callback`` when the running backward pass ends (as DDP does); False if impossible."""
    try:
        torch.autograd.Variable._execution_engine.queue_callback(callback)
        return True
    except Exception:
        return False


class _Hook:
    """A parameter's post-accumulate-grad hook; holds the monitor weakly so that a monitor
    dropped without ``close()`` does not stay alive through the model."""

    __slots__ = ("index", "monitor")

    def __init__(self, monitor: Monitor, index: int) -> None:
        self.monitor = weakref.ref(monitor)
        self.index = index

    def __call__(self, param: torch.Tensor) -> None:
        monitor = self.monitor()
        if monitor is not None:
            monitor._on_grad(self.index, param)


class Monitor:
    """Per-layer gradient statistics of a model, step by step. Create with :func:`watch`.

    Attributes:
        every, mode, accumulation_steps: as passed to :func:`watch`.
        rows: names of the reported rows (layers, or parameters).
        summary: parameters, trainable parameters, bytes and layers of the model.
        errors: messages of failures inside gradscope (training was not interrupted).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        every: int,
        mode: str,
        accumulation_steps: int,
        optimizer,
        scaler,
        track_updates: bool,
        history: int,
        granularity: str,
        params: ParamSelector,
        backend: str,
        hist_history: int,
        thresholds: Thresholds | None = None,
        log_dir: str | os.PathLike | None = None,
        exporters: Sequence[Exporter] = (),
        log_rank: int | None = 0,
        check_consistency: bool = False,
        comm_hook: bool = True,
        batch_size: int | None = None,
        noise_scale_decay: float = 0.95,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch: model must be a torch.nn.Module, got {type(model).__name__}")
        self.every = _positive_int(every, "every")
        self.accumulation_steps = _positive_int(accumulation_steps, "accumulation_steps")
        _positive_int(history, "history")
        _positive_int(hist_history, "hist_history")
        if mode not in MODES:
            raise ValueError(f"watch: mode must be one of {MODES}, got {mode!r}")
        if backend not in ("auto", "triton", "numpy"):
            raise ValueError(f"watch: backend must be 'auto', 'triton' or 'numpy', got {backend!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"watch: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if track_updates and optimizer is None:
            raise ValueError("watch: track_updates=True needs optimizer=")
        if scaler is not None and not hasattr(scaler, "is_enabled"):
            raise TypeError(f"watch: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise TypeError(f"watch: thresholds must be a gradscope.Thresholds, got {type(thresholds).__name__}")
        self.thresholds = thresholds or Thresholds()
        exporters = list(exporters)
        for exporter in exporters:
            if not isinstance(exporter, Exporter):
                raise TypeError(
                    f"watch: exporters must be gradscope.exporters.Exporter objects, got {type(exporter).__name__}"
                )
        if batch_size is not None:
            _positive_int(batch_size, "batch_size")
        if not isinstance(noise_scale_decay, (int, float)) or not 0 <= noise_scale_decay < 1:
            raise ValueError(f"watch: noise_scale_decay must be in [0, 1), got {noise_scale_decay!r}")
        world_all = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if log_rank is not None and (
            isinstance(log_rank, bool) or not isinstance(log_rank, int) or not 0 <= log_rank < world_all
        ):
            raise ValueError(f"watch: log_rank must be None or a rank in [0, {world_all}), got {log_rank!r}")
        target = unwrap(model)
        existing = _WATCHED.get(target)
        if existing is not None and existing() is not None and not existing()._closed:
            raise RuntimeError("watch: this model is already watched by a gradscope monitor; call close() on it first")

        self.mode = mode
        self._model = weakref.ref(target)
        self._optimizer = optimizer
        self._scaler = scaler
        self._watched = select(model, params, granularity)
        self.topology = topo = distributed.topology(model, self._watched.params, self._watched.names)
        if check_consistency and topo.kind != "replicated":
            raise ValueError("watch: check_consistency=True needs a DistributedDataParallel model")
        if track_updates and topo.kind == "sharded":
            raise ValueError("watch: track_updates=True is not supported with sharded (DTensor) parameters yet")
        self.is_logging_rank = log_rank is None or topo.global_rank == log_rank
        if not self.is_logging_rank:
            exporters, log_dir = [], None  # silent: the logging rank has the same numbers
        elif log_rank is None and world_all > 1 and log_dir is not None:
            log_dir = os.path.join(log_dir, f"rank-{topo.global_rank:05d}")
        if log_dir is not None:
            exporters.insert(0, RunLog(log_dir))
        self.rows = self._watched.row_names
        self.row_types = self._watched.row_types
        self.summary = model_summary(target, len(self.rows))
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._closed = False
        self._warned: set[str] = set()

        # Capture engines, one per device the kernels serve, NumPy for the rest.
        engines: dict[object, list[int]] = {}
        for index, p in enumerate(self._watched.params):
            key = self._engine_key(p.device, backend)
            engines.setdefault(key, []).append(index)
        if len(engines) > 1 and (topo.kind == "sharded" or check_consistency):
            raise ValueError(
                "watch: in a distributed run the watched parameters must be on one device; "
                f"found {sorted(str(p.device) for p in {p.device: p for p in self._watched.params}.values())}"
            )
        self._captures: dict[object, KernelCapture | NumpyCapture] = {}
        self._route: list[tuple[object, int]] = [None] * len(self._watched)  # parameter -> (engine, row)
        for key, members in engines.items():
            device = torch.device("cpu") if key == "numpy" else key
            combiner = ShardedRows(topo, np.array(members), device) if topo.kind == "sharded" else None
            if key == "numpy":
                overlap = mode == "backward" and _spare_cores()
                self._captures[key] = NumpyCapture(len(members), overlap=overlap, combiner=combiner)
            else:
                self._captures[key] = KernelCapture(key, len(members), combiner=combiner)
            for local, index in enumerate(members):
                self._route[index] = (key, local)
        self._members = {key: np.array(members) for key, members in engines.items()}

        # DDP: gradscope's communication hook, the noise scale and the per-step check.
        self._replicated = topo.kind == "replicated"
        self._hook_state = None
        self._noise: NoiseScale | None = None
        self._replicas: ReplicaCheck | None = None
        if self._replicated and topo.world > 1:
            if comm_hook:
                self._hook_state, why = install_hook(find_ddp(model))
                if self._hook_state is None:
                    self._warn_once(
                        "comm-hook",
                        f"gradscope: {why}; the gradient noise scale and the rank a non-finite gradient "
                        "came from are not measured (watch(..., comm_hook=False) silences this)",
                    )
                else:
                    self._noise = NoiseScale(topo.world, batch_size, noise_scale_decay)
            if self._hook_state is not None or check_consistency:
                key = next(iter(engines))  # one device (checked above when rows are hashed)
                device = torch.device("cpu") if key == "numpy" else key
                self._replicas = ReplicaCheck(
                    topo.group, topo.rank, topo.world, len(self._watched), check_consistency, device
                )
                if check_consistency and key != "numpy":
                    self._captures[key].zero_rows = True

        # Grouping parameter rows into reported rows (layers).
        self._perm = np.argsort(self._watched.row_of, kind="stable")
        self._row_starts = np.flatnonzero(np.r_[True, np.diff(self._watched.row_of[self._perm]) != 0])

        device = next((p.device for p in self._watched.params if p.device.type == "cuda"), torch.device("cpu"))
        self._clock = StepClock(device)
        row_numel = np.bincount(self._watched.row_of, weights=self._watched.numel, minlength=len(self.rows))
        info = RunInfo(
            rows=self.rows,
            row_types=self.row_types,
            summary=self.summary,
            every=self.every,
            mode=mode,
            granularity=granularity,
            history=history,
            hist_history=hist_history,
            track_updates=track_updates,
            row_numel=tuple(int(n) for n in row_numel),
            extra={
                "gradscope": _version(),
                "torch": torch.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **({"distributed": topo.to_dict()} if topo.kind != "single" or topo.world > 1 else {}),
            },
        )
        self._run = RunState(info)
        header = records.Header(info.to_dict(), thresholds=dataclasses.asdict(self.thresholds))
        self._pump = RecordPump(exporters, header) if exporters else None

        # Per-step state.
        self._step = 0
        self._backwards = 0  # backward passes finished in the open step
        self._backward_open = False
        self._capturing = False  # this backward is being measured
        self._started: set = set()  # captures started for the open step
        self._present = np.zeros(len(self._watched), dtype=bool)
        self._order = np.full(len(self._watched), -1, dtype=np.int64)
        self._next_order = 0
        self._pending: dict[int, tuple[np.ndarray, np.ndarray, set, dict]] = {}
        self._failed_steps: set[int] = set()  # their measurements are not trusted: recorded as absent

        self._handles = []
        if mode == "backward":
            for index, p in enumerate(self._watched.params):
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(_Hook(self, index)))
        self._updates = UpdateTracker(optimizer, self._watched.params, self._update_step) if track_updates else None
        _WATCHED[target] = weakref.ref(self)
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)
        if self._hook_state is not None:
            self._hook_state.measuring = True  # step 0 is sampled

    # ---- set-up helpers -----------------------------------------------------------------

    @staticmethod
    def _engine_key(device: torch.device, backend: str):
        if backend != "numpy" and triton_backend.serves(device):
            if backend == "triton" or device.type == "cuda":
                return device
        if backend == "triton":
            raise ValueError(f"watch: backend='triton' cannot read parameters on {device}")
        return "numpy"

    # ---- hooks --------------------------------------------------------------------------

    def _on_grad(self, index: int, param: torch.Tensor) -> None:
        if self._closed or self._step % self.every:  # unsampled step: nothing to do
            return
        try:
            with self._lock:
                if not self._backward_open:
                    self._backward_open = True
                    self._capturing = self._backwards == self.accumulation_steps - 1
                    if not _queue_end_of_backward(self._on_backward_end):
                        self._warn_once(
                            "callback", "gradscope: cannot detect the end of backward; measuring at mon.step()"
                        )
                if not self._capturing or self._step in self._failed_steps:
                    return  # not measured, or void already: one failure per step is enough
                self._order[index] = self._next_order
                self._next_order += 1
                if self._replicated:
                    return  # DDP has not averaged this gradient yet: measured when backward ends
                key, local = self._route[index]
                if key not in self._started:
                    self._start(key)
                self._captures[key].add(local, distributed.local_tensor(param.grad))
                self._present[index] = True
        except Exception as error:
            self._fail(error)

    def _on_backward_end(self, deferred: bool = False) -> None:
        try:
            with self._lock:
                if self._replicated and self._capturing and not deferred:
                    # DDP queues its own end-of-backward callback (which finishes averaging)
                    # after ours: measure from a callback queued behind it.
                    if _queue_end_of_backward(lambda: self._on_backward_end(deferred=True)):
                        return
                self._backward_open = False
                self._backwards += 1
                if self._capturing:
                    self._capturing = False
                    if self._replicated:
                        self._capture_step_mode()
                    else:
                        for key in self._started:
                            self._captures[key].end_backward()
        except Exception as error:
            self._fail(error)

    # ---- measuring ----------------------------------------------------------------------

    def _scale_tensor(self) -> torch.Tensor | None:
        """The GradScaler's scale (a device tensor), if the gradients are still scaled."""
        scaler = self._scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)
        if scale is None:
            return None
        if self.mode == "step" and self._optimizer is not None:
            state = getattr(scaler, "_per_optimizer_states", {}).get(id(self._optimizer), {})
            if getattr(state.get("stage"), "name", None) == "UNSCALED":
                return None  # scaler.unscale_(optimizer) ran before mon.step()
        return scale

    def _start(self, key) -> None:
        scale = self._scale_tensor()
        capture = self._captures[key]
        if scale is None:
            capture.start(None)
        elif key == "numpy":
            capture.start(float(scale.double().reciprocal().float()))
        else:
            capture.start(scale.double().reciprocal().float().to(key))  # as GradScaler computes it
        self._started.add(key)

    def _capture_step_mode(self) -> None:
        grads: dict[object, tuple[list[int], list[torch.Tensor]]] = {}
        for index, p in enumerate(self._watched.params):
            if p.grad is not None:
                key, local = self._route[index]
                locals_, tensors = grads.setdefault(key, ([], []))
                locals_.append(local)
                tensors.append(distributed.local_tensor(p.grad))
                self._present[index] = True
        for key, (locals_, tensors) in grads.items():
            self._start(key)
            self._captures[key].add_all(locals_, tensors)

    def step(self, loss=None, **metrics) -> None:
        """Mark the end of one optimisation step (call it after backward, before ``optimizer.step()``).

        Args:
            loss: the step's loss, a number or a one-element tensor (kept on its device and
                read later: this never synchronises).
            metrics: other scalars of this step (numbers or one-element tensors).
        """
        if self._closed:
            self._warn_once("closed", "gradscope: mon.step() after close() is ignored")
            return
        values = {}
        for name, value in (("loss", loss), *metrics.items()):
            if value is not None:
                values[name] = as_scalar(value, name)
        step = self._step
        try:
            with self._lock:
                sampled = step % self.every == 0
                if sampled:
                    if self.mode == "step":
                        try:
                            self._capture_step_mode()
                        except Exception as error:
                            self._fail(error)  # the step is void, but its collectives still run
                    self._finish_sampled(step)
                    self._raise_capture_errors()
                scale = self._scaler_scale_value()
                if scale is not None:
                    values["grad_scale"] = scale
                self._clock.tick(step, values)
                if step % _CHECK_NEW_PARAMS_EVERY == 1:
                    self._check_new_params()
                self._collect(block=False)
        except Exception as error:
            self._fail(error)
        finally:
            with self._lock:
                self._step += 1
                self._backwards = 0
                self._capturing = False
                self._started = set()
                self._present[:] = False
                self._order[:] = -1
                self._next_order = 0
                if self._hook_state is not None:
                    self._hook_state.measuring = self._step % self.every == 0

    def _finish_sampled(self, step: int) -> None:
        """End a sampled step's captures and issue its collectives. In a distributed run every
        rank issues the same collectives at every sampled step, whatever happened locally
        (a failure here only voids the step), so that no rank waits forever."""
        failed = step in self._failed_steps
        errors = []
        if self.topology.kind == "sharded":
            for key, capture in self._captures.items():
                if key not in self._started:  # no gradient here: this rank still combines zeros
                    capture.start(None)
                    self._started.add(key)
        sources = set(self._started)
        if self._replicas is not None:
            rows = local_sq = averaged_sq = None
            try:
                if self._hook_state is not None:
                    local_sq, averaged_sq = self._hook_state.take()
                if self._replicas.check_consistency and self._started:
                    (key,) = self._started
                    rows = self._captures[key].device_rows()
            except Exception as error:
                errors.append(error)
                failed = True
            self._replicas.issue(step, local_sq, averaged_sq, rows, failed)
            sources.add("replicas")
        for key in self._started:
            try:
                self._captures[key].finish(step, failed=failed)
            except Exception as error:
                errors.append(error)
        self._pending[step] = (self._present.copy(), self._order.copy(), sources, {})
        if errors:
            raise errors[0]

    def _scaler_scale_value(self):
        scaler = self._scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)
        return None if scale is None else scale.detach().reshape(())

    def _update_step(self) -> int | None:
        """The step an optimizer step now belongs to: the one ``mon.step()`` just closed."""
        step = self._step - 1
        if step < 0:
            self._warn_once("order", "gradscope: call mon.step() after backward and before optimizer.step()")
            return None
        return step if step % self.every == 0 else None

    def log(self, **metrics) -> None:
        """Attach scalar metrics (numbers, or tensors read now) to the most recent step."""
        if self._closed:
            self._warn_once("closed-log", "gradscope: mon.log() after close() is ignored")
            return
        values = {name: float(as_scalar(value, name)) for name, value in metrics.items()}
        with self._lock:
            self._emit(records.Metrics(max(self._step - 1, 0), values))

    # ---- collecting ---------------------------------------------------------------------

    def _collect(self, block: bool) -> None:
        for key, capture in self._captures.items():
            for step, rows in capture.completed(block):
                if step in self._pending:
                    self._pending[step][3][key] = rows
        if self._replicas is not None:
            for step, result in self._replicas.completed(block):
                if step in self._pending:
                    self._pending[step][3]["replicas"] = result
        for step in sorted(self._pending):
            present, order, started, arrived = self._pending[step]
            if len(arrived) < len(started):
                break
            del self._pending[step]
            self._record_sampled(step, present, order, arrived)
        for record in self._clock.completed(block):
            values = {"step_time": record.step_time, "peak_memory": record.peak_memory, "energy": record.energy}
            self._emit(records.StepValues(record.step, {**values, **record.values}))
        if self._updates is not None:
            for step, weight_sq, update_sq in self._updates.completed(block):
                self._emit(records.Updates(step, self._sum_rows(weight_sq), self._sum_rows(update_sq)))

    def _emit(self, record: records.Record) -> None:
        """Apply a record to the run's state and hand it to the exporters."""
        self._run.apply(record)
        if self._pump is not None:
            self._pump.put(record)

    def _sum_rows(self, per_param: np.ndarray) -> np.ndarray:
        return np.add.reduceat(per_param[self._perm], self._row_starts)

    def _record_sampled(self, step: int, present: np.ndarray, order: np.ndarray, arrived: dict) -> None:
        replica = arrived.pop("replicas", None)
        if replica is not None:
            self._record_replicas(step, replica)
        if any(payload is None for payload in arrived.values()) and step not in self._failed_steps:
            self._emit(records.Failed(step))  # another rank could not measure this step
            self._failed_steps.add(step)
        if step in self._failed_steps:
            self._failed_steps.discard(step)
            present = np.zeros_like(present)
        n_params = len(self._watched)
        param_rows = np.zeros((n_params, layout.ROW_WIDTH))
        param_rank = np.full(n_params, -1, dtype=np.int64)
        param_ranks = np.zeros(n_params, dtype=np.int64)
        for key, payload in arrived.items():
            members = self._members[key]
            if isinstance(payload, CombinedRows):
                param_rows[members] = payload.rows
                param_rank[members] = payload.nonfinite_rank
                param_ranks[members] = payload.nonfinite_ranks
            elif payload is not None:
                param_rows[members] = payload
        if self.topology.kind == "sharded" and present.any():
            present = present | (param_rows[:, layout.NUMEL] > 0)  # another rank held this gradient
        if not present.any():  # no gradient at all this step (e.g. mon.step() without backward)
            rows = len(self.rows)
            self._emit(
                records.Sampled(step, np.zeros((rows, layout.ROW_WIDTH)), np.zeros(rows, bool), np.full(rows, -1))
            )
            return
        param_rows[~present] = 0
        sorted_rows = param_rows[self._perm]
        rows = np.add.reduceat(sorted_rows, self._row_starts, axis=0)
        rows[:, layout.MAX_ABS] = np.maximum.reduceat(sorted_rows[:, layout.MAX_ABS], self._row_starts)
        row_present = np.logical_or.reduceat(present[self._perm], self._row_starts)
        ranked = np.where(present & (order >= 0), order, _NO_ORDER)[self._perm]
        row_order = np.minimum.reduceat(ranked, self._row_starts)
        row_order[row_order == _NO_ORDER] = -1
        rank = ranks = None
        if self.topology.kind == "sharded":
            first = np.where(present & (param_rank >= 0), param_rank, _NO_ORDER)[self._perm]
            rank = np.minimum.reduceat(first, self._row_starts)
            rank[rank == _NO_ORDER] = -1
            ranks = np.maximum.reduceat(np.where(present, param_ranks, 0)[self._perm], self._row_starts)
        elif self._replicated:
            bad = row_present & (rows[:, layout.NANS] + rows[:, layout.INFS] > 0)
            culprits = replica.nonfinite_ranks if replica is not None else ()
            rank = np.where(bad, min(culprits) if culprits else -1, -1)
            ranks = np.where(bad, len(culprits), 0)
        self._emit(records.Sampled(step, rows, row_present, row_order, rank, ranks))

    def _record_replicas(self, step: int, result) -> None:
        """What the DDP replicas' collective said about ``step``: noise scale, disagreement."""
        if result.desync_params:
            layers = sorted({int(self._watched.row_of[i]) for i in result.desync_params})
            self._emit(records.Desync(step, tuple(layers), result.desync_ranks))
        if self._noise is not None and not np.isnan(result.small_sq):
            value = self._noise.update(result.small_sq, result.big_sq)
            self._emit(
                records.StepValues(
                    step, {"noise_scale": value, "grad_sq_small": result.small_sq, "grad_sq_big": result.big_sq}
                )
            )

    # ---- reading ------------------------------------------------------------------------

    def history(self, field: str) -> Series:
        """Values of ``field`` over the kept steps, oldest first (waits for pending steps).

        Per-row fields (``(steps, rows)``; NaN where a row had no gradient): ``numel``,
        ``sum``, ``sumsq``, ``max_abs``, ``zeros``, ``nans``, ``infs``, ``norm``, ``rms``,
        ``mean``, ``zero_frac``, ``nonfinite``, ``finite``, ``present``,
        ``backward_order`` (0 = the row whose gradient was final first), ``hist``
        (``(steps, rows, 64)``), and with ``track_updates`` ``weight_norm``,
        ``update_norm``, ``update_ratio``. Per-step fields (``(steps,)``, every step):
        ``loss``, ``step_time`` (s), ``peak_memory`` (bytes), ``energy`` (J),
        ``grad_scale``, ``skipped``, ``failed``, every logged metric and, under DDP with
        gradscope's communication hook, ``noise_scale`` (``B_simple``), ``grad_sq_small``
        (each rank's own ``|g_i|^2``, mean over ranks) and ``grad_sq_big`` (``|g|^2`` averaged).
        """
        self._collect_now()
        return self._run.series(field)

    def fields(self) -> tuple[str, ...]:
        """Names :meth:`history` accepts."""
        self._collect_now()
        return self._run.fields()

    def stats(self, step: int | None = None) -> TensorStats:
        """Statistics of the rows present at a sampled ``step`` (default: the latest)."""
        self._collect_now()
        return self._run.stats(step)

    def report(self, thresholds: Thresholds | None = None, wait: bool = False) -> HealthReport:
        """The run's health: status, findings, per-layer rows and resources.

        Cheap enough to call every step: it reads what has reached the host (on GPU, steps
        whose results are still in flight are judged by the next call) over a bounded
        window of sampled steps. ``wait=True`` first waits for every step in flight.
        ``thresholds`` overrides the monitor's :class:`gradscope.Thresholds`.
        """
        with self._lock:
            if not self._closed:
                self._collect(block=wait)
            return self._run.report(thresholds or self.thresholds)

    @property
    def step_index(self) -> int:
        """Steps completed so far (``mon.step()`` calls)."""
        return self._step

    def _collect_now(self) -> None:
        with self._lock:
            if not self._closed:
                self._collect(block=True)

    # ---- failures and warnings ----------------------------------------------------------

    def _raise_capture_errors(self) -> None:
        for source in (*self._captures.values(), self._updates):
            error = getattr(source, "error", None)
            if error is not None:
                source.error = None
                raise error

    def _fail(self, error: BaseException) -> None:
        step = self._step
        self._emit(records.Failed(step))
        if step % self.every == 0:
            self._failed_steps.add(step)
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(f"step {step}: {type(error).__name__}: {error}")
        self._warn_once(
            "failure",
            f"gradscope: monitoring failed at step {step} ({type(error).__name__}: {error}); "
            "training is not affected, the step is marked failed and later failures are listed in mon.errors",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            if self.is_logging_rank:  # other ranks of a distributed run stay silent
                warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _check_new_params(self) -> None:
        model = self._model()
        if model is None:
            return
        new = untracked(model, self._watched)
        if new:
            self._warn_once(
                "new-params",
                f"gradscope: parameters added after watch() are not monitored: {', '.join(new[:10])}"
                + (" ..." if len(new) > 10 else "")
                + "; close() and watch() again to include them",
            )

    # ---- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every hook and release the model (history stays readable). Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self._collect(block=True)
            except Exception as error:
                self._fail(error)
            self._closed = True
            _remove_handles(self._handles)
            if self._updates is not None:
                self._updates.close()
            for capture in self._captures.values():
                capture.close()
            if self._hook_state is not None:
                self._hook_state.measuring = False  # the hook goes on averaging, measuring nothing
                self._hook_state.take()
            if self._replicas is not None:
                self._replicas.close()
            if self._pump is not None:
                self._pump.close(self._step)
                self.errors.extend(self._pump.errors)
            self._pending.clear()
            self._watched = None
            self._optimizer = None
            self._scaler = None
            target = self._model()
            if target is not None and _WATCHED.get(target) is not None and _WATCHED[target]() is self:
                del _WATCHED[target]

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}"
        return f"<gradscope.Monitor {self.mode} mode, every={self.every}, {len(self.rows)} rows, {state}>"


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
