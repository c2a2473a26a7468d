"""``Monitor``: one model's gradients measured during training, step by step, no host sync.

The monitor owns the life of a watched model: it finds the parameters and their rows
(:mod:`~gradscope.monitor.watched`), hooks backward (:mod:`~gradscope.monitor.hooks`), hands
each final gradient to a capture engine per device (:mod:`~gradscope.monitor.capture`),
closes each optimisation step at ``mon.step()``, and turns what reaches the host into
records (:mod:`gradscope.run.records`) that feed its run state and its exporters. Reading
(``history``, ``stats``, ``report``) is :class:`gradscope.health.readout.RunReadout`'s.

In ``mode="backward"`` (the default) gradients are measured as soon as they are final,
overlapping the rest of backward; in ``mode="step"``, all at ``mon.step()``; both give
identical numbers. Results reach the host through pinned memory and CUDA events: the host
reads a step once its event has completed (usually one step later) or when asked
(``history()``, ``stats()``, ``close()``), and only then waits.

A failure inside gradscope never reaches training: the step is recorded as failed (its
measurements as absent, never as zeros), the error goes to ``mon.errors`` and one warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import weakref
from collections.abc import Iterator

import numpy as np
import torch

from gradscope.distributed import topology as topologies
from gradscope.health.readout import RunReadout
from gradscope.monitor import hooks, scaler
from gradscope.monitor.acting import Acting
from gradscope.monitor.aggregate import LayerRows, RowGroups, blame_replicas
from gradscope.monitor.backward import BackwardReceiver
from gradscope.monitor.checkpoint import Checkpointing
from gradscope.monitor.engines import Engines
from gradscope.monitor.failures import FailureReporting
from gradscope.monitor.forward import ForwardCapture
from gradscope.monitor.options import WatchOptions
from gradscope.monitor.replicated import DdpExtras
from gradscope.monitor.resources import StepClock, as_scalar, check_metric_names, describe_run
from gradscope.monitor.updates import UpdateTracker
from gradscope.monitor.watched import new_params_warning, select
from gradscope.outputs.pump import RecordPump
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats import layout
from gradscope.stats.dispatch import is_host

_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> weakref(Monitor)


def shut_down(handles: list, forward, engines: Engines, pump: RecordPump | None, steps_done: list[int]) -> None:
    """End what a monitor started: its hooks, its capture workers and its pump, which delivers
    what is queued, writes the closing record and closes every exporter (the run log's file).
    Run once, by ``close()`` or, for a monitor dropped without it, by its finalizer."""
    hooks.release(handles, forward)
    engines.close()
    if pump is not None:
        pump.close(steps_done[0])


_CHECK_NEW_PARAMS_EVERY = 100  # steps between checks for parameters added after watch()
STEP_BATCH = 16
"""Between sampled steps, the values of up to this many steps (loss, step time...) wait to be
recorded together: recorded one by one right after each backward pass, their Python work
runs with caches that backward has just emptied (batching took an unsampled ``mon.step()``
from about 205 to 145 µs on the demo MLP, 2-core CPU). Nothing waits when the monitor acts
on findings (a NaN loss must halt at its step), at sampled steps, or when anything reads the
run."""


class Monitor(RunReadout, BackwardReceiver, Acting, Checkpointing, FailureReporting):
    """Per-layer gradient statistics of a model, step by step. Create with :func:`gradscope.watch`.

    Attributes:
        options: the :class:`~gradscope.monitor.options.WatchOptions` it was created with.
        every, mode, accumulation_steps: as passed to :func:`gradscope.watch`.
        rows: names of the reported rows (layers, or parameters).
        summary: parameters, trainable parameters, bytes and layers of the model.
        topology: how the model is spread over ranks (:mod:`gradscope.distributed.topology`).
        is_logging_rank: whether this rank writes the run log, feeds exporters and warns.
        errors: messages of failures inside gradscope (training was not interrupted).
    """

    def __init__(self, model: torch.nn.Module, options: WatchOptions) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch: model must be a torch.nn.Module, got {type(model).__name__}")
        target = topologies.unwrap(model)
        existing = _WATCHED.get(target)
        if existing is not None and existing() is not None and not existing()._closed:
            raise RuntimeError("watch: this model is already watched by a gradscope monitor; call close() on it first")
        self.options = options
        self.every, self.mode, self.accumulation_steps = options.every, options.mode, options.accumulation_steps
        self.thresholds = options.thresholds
        self._model = weakref.ref(target)
        self._optimizer, self._scaler = options.optimizer, options.scaler
        self._watched = select(model, options.params, options.granularity)
        self.topology = topo = topologies.topology(model, self._watched.params, self._watched.names)
        self._replicated = topo.kind == "replicated"  # read in every hook call
        if options.check_consistency and topo.kind != "replicated":
            raise ValueError("watch: check_consistency=True needs a DistributedDataParallel model")
        if options.track_updates and topo.kind == "sharded":
            raise ValueError("watch: track_updates=True is not supported with sharded (DTensor) parameters yet")
        self.is_logging_rank = options.log_rank is None or topo.global_rank == options.log_rank
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._closed = False
        self._warned: set[str] = set()

        self._engines = Engines(
            self._watched.params,
            options.backend,
            options.mode,
            topo,
            # No reference back to the monitor (a cycle would keep a dropped monitor alive).
            functools.partial(scaler.inv_scale_for, options.scaler, options.optimizer, options.mode),
            one_device=options.check_consistency,
        )
        self._groups = RowGroups(self._watched.row_of)
        self._ddp: DdpExtras | None = None
        if topo.kind == "replicated" and topo.world > 1:
            key = self._engines.first  # the only one when rows are hashed
            device = torch.device("cpu") if is_host(key) else key
            ddp = DdpExtras(model, topo, options, len(self._watched), device, self._warn_once)
            self._ddp = ddp if ddp.active else None
            if options.check_consistency and not is_host(key):
                self._engines.captures[key].zero_rows = True  # hashed rows of absent parameters must be zeros
        device = next((p.device for p in self._watched.params if p.device.type == "cuda"), torch.device("cpu"))
        self._clock = StepClock(device)
        self._forward = None
        if options.forward:
            self._forward = ForwardCapture.of(target, options.backend, topo, device, hooks.failure_reporter(self))
            self._forward.install()  # step 0 is sampled
        self.info = describe_run(target, options, self._watched, topo, self._forward)
        self._run = RunState(self.info)
        exporters = self.options.destinations(topo) if self.is_logging_rank else []  # silent ranks: none
        header = records.Header(self.info.to_dict(), thresholds=dataclasses.asdict(self.thresholds))
        self._pump = RecordPump(exporters, header) if exporters else None

        # The open step.
        self._step = 0
        self._engines.histogram = self.histogram_step(0)
        self._passes = hooks.BackwardPasses(options.accumulation_steps, len(self._watched))
        # Sampled steps whose results are on their way: step -> (present, order, sources, arrived).
        self._pending: dict[int, tuple[np.ndarray, np.ndarray, set, dict]] = {}
        self._failed_steps: set[int] = set()  # their measurements are not trusted: recorded as absent

        self._install_grad_hooks()
        rule = options.halt_rule
        self._halt_at_once = rule is not None and rule.halts_on_nonfinite
        self._start_acting()  # before the update tracker (see Acting._start_acting)
        self._updates = None
        if options.track_updates:
            self._updates = UpdateTracker(options.optimizer, self._watched.params, self._update_step)
        _WATCHED[target] = weakref.ref(self)
        # What close() must end, also for a monitor dropped without it (as DataLoader's
        # iterator shuts its workers down): hooks, capture workers, the pump (which writes the
        # closing record and closes the log). Parts only: a reference to self would keep it alive.
        self._steps_done = [0]
        self._finalizer = weakref.finalize(
            self, shut_down, self._handles, self._forward, self._engines, self._pump, self._steps_done
        )

    # ---- measuring ----------------------------------------------------------------------

    def histogram_step(self, step: int) -> bool:
        """Whether sampled ``step`` computes every row's histogram (one sampled step in
        ``histogram_every``); the others get light rows (:mod:`gradscope.stats.layout`)."""
        return step % (self.every * self.options.histogram_every) == 0

    def step(self, loss=None, **metrics) -> None:
        """Mark the end of one optimisation step (call it after backward, before ``optimizer.step()``).

        Args:
            loss: the step's loss, a number or a one-element tensor (kept on its device and
                read later: this never synchronises).
            metrics: other scalars of this step (numbers or one-element tensors).

        Raises:
            gradscope.TrainingHalted: a finding named by ``watch(..., halt_on=...)`` appeared
                (the step is complete: the monitor goes on if the loop does).
        """
        if self._closed:
            self._warn_once("closed", "gradscope: mon.step() after close() is ignored")
            return
        check_metric_names(metrics)
        given = (("loss", loss), *metrics.items())
        values = {name: as_scalar(value, name) for name, value in given if value is not None}
        step = self._step
        try:
            with self._lock:
                self._close_open_pass()
                if step % self.every == 0:
                    if self.mode == "step":
                        try:
                            self._engines.add_all(self._watched.params)
                        except Exception as error:
                            self._fail(error)  # the step is void, but its collectives still run
                    self._finish_sampled(step)
                    self._finish_forward(step)
                    self._engines.raise_error()
                    self._raise_update_error()
                scale = scaler.scale_tensor(self._scaler)
                if scale is not None:
                    values["grad_scale"] = scale
                self._clock.tick(step, values)
                if step % _CHECK_NEW_PARAMS_EVERY == 1:
                    self._check_new_params()
                wait_for = 1 if self._responder is not None or step % self.every == 0 else STEP_BATCH
                # halt_on a NaN: judge this step before its optimizer update (on CUDA, a host sync)
                self._collect(block=self._halt_at_once and step % self.every == 0, steps_at_least=wait_for)
        except Exception as error:
            self._fail(error)
        finally:
            with self._lock:
                self._step += 1
                self._steps_done[0] = self._step
                self._passes.reset()
                self._engines.reset()
                self._engines.histogram = self.histogram_step(self._step)
                if self._ddp is not None:
                    self._ddp.measuring = self._step % self.every == 0
                if self._forward is not None:
                    if self._step % self.every == 0:
                        self._forward.install()
                    else:
                        self._forward.remove()  # unsampled steps run without forward hooks
        if self._responder is not None:
            self._act(step)  # may raise TrainingHalted (watch(..., halt_on=...))

    def _finish_forward(self, step: int) -> None:
        """Close a sampled step's forward statistics (dropped if the step failed)."""
        if self._forward is not None:
            self._forward.finish(step, failed=step in self._failed_steps)

    def _finish_sampled(self, step: int) -> None:
        """End a sampled step's captures and issue its collectives. In a distributed run every
        rank issues the same collectives at every sampled step, whatever happened locally
        (a failure here only voids the step), so that no rank waits forever."""
        failed = step in self._failed_steps
        errors, sources = [], set()
        if self._ddp is not None:
            device_rows = self._engines.device_rows if self._engines.started else None
            error = self._ddp.issue(step, device_rows, failed)
            if error is not None:
                errors.append(error)
                failed = True
            sources.add("replicas")
        errors += self._engines.finish(step, failed)
        sources |= self._engines.started
        self._pending[step] = (self._engines.present.copy(), self._passes.order.copy(), sources, {})
        if errors:
            raise errors[0]

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
        check_metric_names(metrics)
        values = {name: float(as_scalar(value, name)) for name, value in metrics.items()}
        with self._lock:
            self._emit(records.Metrics(max(self._step - 1, 0), values))

    # ---- collecting ---------------------------------------------------------------------

    def _collect(self, block: bool, steps_at_least: int = 1) -> None:
        for step, key, rows in self._engines.completed(block):
            if step in self._pending:
                self._pending[step][3][key] = rows
        if self._ddp is not None:
            for step, result in self._ddp.completed(block):
                if step in self._pending:
                    self._pending[step][3]["replicas"] = result
        for step in sorted(self._pending):
            present, order, sources, arrived = self._pending[step]
            if len(arrived) < len(sources):
                break
            del self._pending[step]
            self._record_sampled(step, present, order, arrived)
        if self._forward is not None:
            for record in self._forward.completed(block):
                self._emit(record)
        for record in self._clock.completed(block, steps_at_least):
            values = {"step_time": record.step_time, "peak_memory": record.peak_memory, "energy": record.energy}
            self._emit(records.StepValues(record.step, {**values, **record.values}))
        if self._updates is not None:
            for step, weight_sq, update_sq in self._updates.completed(block):
                self._emit(records.Updates(step, self._groups.sum(weight_sq), self._groups.sum(update_sq)))

    def _emit(self, record: records.Record) -> None:
        """Apply a record to the run's state and hand it to the exporters."""
        self._run.apply(record)
        if self._pump is not None:
            self._pump.put(record)
        self._observe(record)

    def _record_sampled(self, step: int, present: np.ndarray, order: np.ndarray, arrived: dict) -> None:
        replica = arrived.pop("replicas", None)
        if replica is not None:
            for record in self._ddp.records(step, replica, self._watched.row_of):
                self._emit(record)
        if any(payload is None for payload in arrived.values()) and step not in self._failed_steps:
            self._emit(records.Failed(step))  # another rank could not measure this step
            self._failed_steps.add(step)
        if step in self._failed_steps:
            self._failed_steps.discard(step)
            present = np.zeros_like(present)
        param_rows, rank, ranks = self._engines.param_rows(arrived)
        sharded = self.topology.kind == "sharded"
        if sharded and present.any():
            present = present | (param_rows[:, layout.NUMEL] > 0)  # another rank held this gradient
        if not present.any():  # no gradient at all this step (e.g. mon.step() without backward)
            n_rows = len(self.rows)
            layer = LayerRows(np.zeros((n_rows, layout.ROW_WIDTH)), np.zeros(n_rows, bool), np.full(n_rows, -1))
        elif sharded:
            layer = self._groups.combine(param_rows, present, order, rank, ranks)
        else:
            layer = self._groups.combine(param_rows, present, order)
            if self._replicated:
                layer = blame_replicas(layer, replica.nonfinite_ranks if replica is not None else ())
        self._emit(
            records.Sampled(step, layer.rows, layer.present, layer.order, layer.nonfinite_rank, layer.nonfinite_ranks)
        )

    # ---- reading (history, fields, stats and report are RunReadout's) --------------------

    @contextlib.contextmanager
    def _reading(self, wait: bool) -> Iterator[RunState]:
        with self._lock:
            if not self._closed:
                self._collect(block=wait)
            yield self._run

    def _in_flight(self) -> tuple[int, ...]:
        """Sampled steps whose statistics have not all reached the host."""
        forward = self._forward.pending if self._forward is not None else ()
        return tuple(sorted({*self._pending, *forward}))

    @property
    def step_index(self) -> int:
        """Steps completed so far (``mon.step()`` calls)."""
        return self._step

    # ---- failures and warnings ----------------------------------------------------------

    def _raise_update_error(self) -> None:
        if self._updates is not None and self._updates.error is not None:
            error, self._updates.error = self._updates.error, None
            raise error

    def _check_new_params(self) -> None:
        model = self._model()
        message = new_params_warning(model, self._watched) if model is not None else None
        if message:
            self._warn_once("new-params", message)

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
            if self._forward is not None:
                self._forward.close()
            if self._updates is not None:
                self._updates.close()
            if self._responder is not None:
                self._responder.close()
            if self._ddp is not None:
                self._ddp.close()
            self._finalizer()  # hooks, capture workers, the pump: see __init__
            if self._pump is not None:
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
