"""``Monitor``: one model's gradients measured during training, step by step, no host sync.

The monitor owns the life of a watched model: it finds the parameters and their rows
(:mod:`~gradscope.monitor.watched`), hooks backward, hands each final gradient to a capture
engine per device (:mod:`~gradscope.monitor.engines`), closes each optimisation step at
``mon.step()``, and turns what reaches the host into records (:mod:`gradscope.run.records`)
that feed its run state and its exporters. Reading (``history``, ``stats``, ``report``) is
:class:`gradscope.health.readout.RunReadout`'s.

It is made of parts, each built in ``__init__`` with what it touches, none holding the
monitor (a dropped monitor is freed at once, and its finalizer ends what it started):

* :class:`~gradscope.monitor.schedule.OpenStep` (``_open``): the open step, which only the
  monitor moves;
* :class:`~gradscope.monitor.failures.Failures` (``_failures``): its own failures and warnings;
* :class:`~gradscope.monitor.backward.BackwardReceiver` (``_backward``): backward's hooks;
* :class:`~gradscope.monitor.recorder.Recorder` (``_recorder``): results in flight, into records;
* :class:`~gradscope.monitor.acting.Acting` (``_acting``): the responder and its read-outs;
* the captures (``_engines``), forward statistics (``_forward``), DDP's extras (``_ddp``),
  the step clock, the update tracker, the run state (``_run``) and the pump (``_pump``).

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
import warnings
import weakref
from collections.abc import Iterator

import torch

from gradscope.actions.halting import TrainingHalted
from gradscope.distributed import pipeline
from gradscope.distributed import topology as topologies
from gradscope.health.readout import RunReadout
from gradscope.monitor import checkpoint, hooks, scaler
from gradscope.monitor.acting import Acting
from gradscope.monitor.aggregate import RowGroups
from gradscope.monitor.backward import BackwardReceiver
from gradscope.monitor.engines import Engines
from gradscope.monitor.failures import Failures
from gradscope.monitor.forward import ForwardCapture, forward_modules
from gradscope.monitor.options import WatchOptions
from gradscope.monitor.recorder import Recorder, RecordSink
from gradscope.monitor.replicated import DdpExtras
from gradscope.monitor.resources import StepClock, as_scalar, check_metric_names, describe_run
from gradscope.monitor.schedule import OpenStep
from gradscope.monitor.shutdown import shut_down
from gradscope.monitor.updates import UpdateTracker
from gradscope.monitor.watched import new_params_warning, select
from gradscope.monitor.weights import WeightReader
from gradscope.outputs.pump import RecordPump
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats.reporting import GradscopeWarning

_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> weakref(Monitor)


_CHECK_NEW_PARAMS_EVERY = 100  # steps between checks for parameters added after watch()
STEP_BATCH = 16
"""Between sampled steps, the values of up to this many steps (loss, step time...) wait to be
recorded together: recorded one by one right after each backward pass, their Python work
runs with caches that backward has just emptied (batching took an unsampled ``mon.step()``
from about 205 to 145 µs on the demo MLP, 2-core CPU). Nothing waits when the monitor acts
on findings (a NaN loss must halt at its step), at sampled steps, or when anything reads the
run."""


class Monitor(RunReadout):
    """Per-layer gradient statistics of a model, step by step. Create with :func:`gradscope.watch`.

    Attributes:
        options: the :class:`~gradscope.monitor.options.WatchOptions` it was created with.
        every, mode, accumulation_steps: as passed to :func:`gradscope.watch`.
        rows: names of the reported rows (layers, or parameters).
        summary: parameters, trainable parameters, bytes and layers of the model.
        topology: how the model is spread over ranks (:mod:`gradscope.distributed.topology`).
        pipeline: for a pipeline stage, where it stands in its pipeline
            (:class:`~gradscope.distributed.pipeline.PipelinePlace`); None otherwise.
        is_logging_rank: whether this rank writes the run log, feeds exporters and warns.
    """

    def __init__(self, model: torch.nn.Module, options: WatchOptions, stage=None) -> None:
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
        self._watched = watched = select(model, options.params, options.granularity, options.names)
        self.topology = topo = topologies.topology(model, watched.params, watched.names)
        self.pipeline = place = None if stage is None else pipeline.place(stage, watched.row_names, options.log_rank)
        if options.check_consistency and topo.kind != "replicated":
            raise ValueError("watch: check_consistency=True needs a DistributedDataParallel model")
        for option in ("track_updates", "compression"):
            if getattr(options, option) and topo.kind == "sharded":
                raise ValueError(f"watch: {option}=True is not supported with sharded (DTensor) parameters yet")
        if options.compression and stage is not None:
            raise ValueError("watch: compression=True is not supported for pipeline stages yet")
        self.is_logging_rank = place.logs if place else options.log_rank is None or topo.global_rank == options.log_rank
        self._lock = threading.RLock()
        self._closed = False
        self._open = OpenStep(options.every, options.histogram_every)

        self._engines = engines = Engines(
            watched.params,
            options.backend,
            options.mode,
            topo,
            # No reference back to the monitor (a cycle would keep a dropped monitor alive).
            functools.partial(scaler.inv_scale_for, options.scaler, options.optimizer, options.mode),
            one_device=options.check_consistency,
        )
        engines.histogram = self._open.has_histograms(0)
        modules = forward_modules(target) if options.forward else ()
        self.info = describe_run(target, options, watched, topo, modules, place)
        self._run = RunState(self.info)
        if self._run.plan.warns and self.is_logging_rank:  # before any hook: nothing to undo if it raises
            warnings.warn(self._run.plan.warning("watch"), GradscopeWarning, stacklevel=3)
        exporters = self.options.destinations(topo, place) if self.is_logging_rank else []  # silent ranks: none
        header = records.Header(self.info.to_dict(), thresholds=dataclasses.asdict(self.thresholds))
        sink = RecordSink(self._run, None)  # the Failed records and the actions' go there directly
        self._backward = self._forward = self._updates = self._weights = self._acting = self._ddp = None
        try:
            self._build_parts(model, target, options, watched, topo, engines, sink)
        except BaseException:  # a part refused: leave no hook behind (no thread was started yet)
            if self._backward is not None:
                hooks.remove_handles(self._backward.handles)
            for part in (self._backward, self._forward, self._updates, self._weights, self._acting, self._ddp):
                if part is not None:
                    part.close()
            raise
        # The pump last: its thread starts and the run log's files are made only for a monitor that exists.
        self._pump = sink.pump = RecordPump(exporters, header) if exporters else None
        _WATCHED[target] = weakref.ref(self)
        # What close() must end, also for a monitor dropped without it (as DataLoader's
        # iterator shuts its workers down): hooks, capture workers, the pump (which writes the
        # closing record and closes the log). Parts only: a reference to self would keep it alive.
        on_optimizer = tuple(part for part in (self._updates, self._weights, self._acting) if part is not None)
        self._finalizer = weakref.finalize(
            self, shut_down, self._backward.handles, self._forward, self._engines, self._pump, self._open, on_optimizer
        )

    def _build_parts(self, model, target, options: WatchOptions, watched, topo, engines: Engines, sink) -> None:
        """The parts between the captures and the pump (see the module docstring), in order."""
        self._failures = failures = Failures(options.every, self.is_logging_rank, sink.put)
        self._ddp = DdpExtras.of(model, topo, options, engines, len(watched), failures.warn_once)
        self._passes = hooks.BackwardPasses(options.accumulation_steps, len(watched))
        self._backward = BackwardReceiver(
            watched.params, engines, self._passes, self._open, failures, self._lock, options.mode, topo
        )
        device = next((p.device for p in watched.params if p.device.type == "cuda"), torch.device("cpu"))
        if options.forward:
            self._forward = ForwardCapture.of(target, options.backend, topo, device, self._backward.fail)
            self._forward.install()  # step 0 is sampled
        self._acting = acting = Acting(options, watched, self.thresholds, self._run, sink.put, failures.report_error)
        self._halt_at_once = options.halt_rule is not None and options.halt_rule.halts_on_nonfinite
        if options.track_updates:  # after Acting: the responder's optimizer hooks run first
            self._updates = UpdateTracker(options.optimizer, watched.params, self._update_step)
        if options.compression:  # the same cadence: the optimizer steps of sampled steps
            self._weights = WeightReader(options.optimizer, watched.params, options.backend, self._update_step)
        self._clock = clock = StepClock(device)
        groups = RowGroups(watched.row_of)
        optimizer_parts = {"updates": self._updates, "weights": self._weights}
        self._recorder = Recorder(
            engines, groups, topo, failures, sink, acting.observe, clock, self._ddp, self._forward, **optimizer_parts
        )

    # ---- the parts' handles and read-outs ------------------------------------------------

    @property
    def errors(self) -> list[str]:
        """Messages of failures inside gradscope (training was not interrupted)."""
        return self._failures.errors

    @property
    def _responder(self):
        """The :class:`~gradscope.actions.responder.Responder` (None without actions)."""
        return self._acting.responder

    @property
    def should_stop(self) -> bool:
        """Early stopping: whether the watched metric has stopped improving (False without it).
        In a distributed run every rank turns True at the same step."""
        return self._acting.should_stop

    @property
    def stop_reason(self) -> str | None:
        """Why :attr:`should_stop` turned True ("val_loss has not improved ... for 5 evaluations")."""
        return self._acting.stop_reason

    @property
    def best_step(self) -> int | None:
        """Early stopping: the step of the watched metric's best value (the checkpoint to keep)."""
        return self._acting.best_step

    @property
    def best_value(self) -> float | None:
        """Early stopping: the watched metric's best value so far."""
        return self._acting.best_value

    @property
    def halted(self) -> TrainingHalted | None:
        """The latest :class:`TrainingHalted` raised by ``mon.step()`` (None if none)."""
        return self._acting.halted

    @property
    def lr_scale(self) -> float:
        """The learning-rate controller's scale of the optimizer's rate (1.0 without it)."""
        return self._acting.lr_scale

    @property
    def step_index(self) -> int:
        """Steps completed so far (``mon.step()`` calls)."""
        return self._open.index

    # ---- measuring ----------------------------------------------------------------------

    def histogram_step(self, step: int) -> bool:
        """Whether sampled ``step`` computes every row's histogram (one sampled step in
        ``histogram_every``); the others get light rows (:mod:`gradscope.stats.layout`)."""
        return self._open.has_histograms(step)

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
            self._failures.warn_once("closed", "gradscope: mon.step() after close() is ignored")
            return
        check_metric_names(metrics)
        given = (("loss", loss), *metrics.items())
        values = {name: as_scalar(value, name) for name, value in given if value is not None}
        step, sampled = self._open.index, self._open.sampled
        try:
            with self._lock:
                self._backward.close_open_pass()
                if sampled:
                    if self.mode == "step":
                        try:
                            self._engines.add_all(self._watched.params, self._passes.took_part())
                        except Exception as error:
                            self._failures.fail(step, error)  # the step is void, but its collectives still run
                    self._recorder.finish(step, self._passes.order)
                    self._engines.raise_error()
                self._failures.report_hook_errors((self._updates, self._weights))
                scale = scaler.scale_tensor(self._scaler)
                if scale is not None:
                    values["grad_scale"] = scale
                self._clock.tick(step, values)
                if step % _CHECK_NEW_PARAMS_EVERY == 1:
                    self._check_new_params()
                wait_for = 1 if self._acting.acts or sampled else STEP_BATCH
                # halt_on a NaN: judge this step before its optimizer update (on CUDA, a host sync)
                self._recorder.collect(block=self._halt_at_once and sampled, steps_at_least=wait_for)
        except Exception as error:
            self._failures.fail(step, error)
        finally:
            with self._lock:
                self._passes.reset()
                self._engines.reset()
                self._open_step(step + 1)
        if self._acting.acts:
            with self._lock:
                halt = self._acting.respond(step, self.report)
            if halt is not None:
                raise halt  # watch(..., halt_on=...)

    def _open_step(self, step: int) -> None:
        """Open ``step``: the parts that work only on sampled steps are set for it."""
        self._open.move_to(step)
        self._engines.histogram = self._open.has_histograms(step)
        if self._ddp is not None:
            self._ddp.measuring = self._open.sampled
        if self._forward is not None:
            if self._open.sampled:
                self._forward.install()
            else:
                self._forward.remove()  # unsampled steps run without forward hooks

    def _update_step(self) -> int | None:
        """The step an optimizer step now belongs to: the one ``mon.step()`` just closed."""
        step = self._open.index - 1
        if step < 0:
            self._failures.warn_once("order", "gradscope: call mon.step() after backward and before optimizer.step()")
            return None
        return step if self._open.is_sampled(step) else None

    def log(self, **metrics) -> None:
        """Attach scalar metrics (numbers, or tensors read now) to the most recent step."""
        if self._closed:
            self._failures.warn_once("closed-log", "gradscope: mon.log() after close() is ignored")
            return
        check_metric_names(metrics)
        values = {name: float(as_scalar(value, name)) for name, value in metrics.items()}
        with self._lock:
            self._recorder.emit(records.Metrics(max(self._open.index - 1, 0), values))

    # ---- reading (history, fields, stats and report are RunReadout's) --------------------

    @contextlib.contextmanager
    def _reading(self, wait: bool) -> Iterator[RunState]:
        with self._lock:
            if not self._closed:
                self._recorder.collect(block=wait)
            yield self._run

    def _in_flight(self) -> tuple[int, ...]:
        """Sampled steps whose statistics have not all reached the host."""
        return self._recorder.in_flight()

    # ---- checkpoints (gradscope.monitor.checkpoint) ---------------------------------------

    def state_dict(self) -> dict:
        """What a training checkpoint should keep of the monitor, as plain Python values: the
        step count and the state of the actions (early stopping's best value and patience,
        the learning-rate controller's scales). Statistics are not in it: they are in the
        run log. Save it with the model's and optimizer's state; see :meth:`load_state_dict`."""
        with self._lock:
            return checkpoint.monitor_state(self._open.state_dict(), self._acting.state_dict())

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` in a new monitor of the resumed run, before its first
        ``mon.step()``: step numbers continue where the checkpoint left them, early stopping
        keeps its best value and patience, and a scaled learning rate stays scaled.

        Raises:
            RuntimeError: the monitor has already stepped.
            ValueError: ``state`` is not a gradscope monitor state.
        """
        step_state, actions_state = checkpoint.parts_of(state)
        with self._lock:
            if self._open.index != 0 or self._recorder.in_flight():
                raise RuntimeError("Monitor.load_state_dict: call it before the first mon.step()")
            self._open.load_state_dict(step_state)
            self._open_step(self._open.index)
            self._acting.load_state_dict(actions_state)

    # ---- warnings -----------------------------------------------------------------------

    def _check_new_params(self) -> None:
        model = self._model()
        message = new_params_warning(model, self._watched) if model is not None else None
        if message:
            self._failures.warn_once("new-params", message)

    # ---- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every hook and release the model (history stays readable). Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self._recorder.collect(block=True)
            except Exception as error:
                self._failures.fail(self._open.index, error)
            self._failures.report_hook_errors((self._updates, self._weights))  # the last optimizer step
            self._closed = True
            self._backward.close()
            for part in (self._forward, self._ddp):
                if part is not None:
                    part.close()
            self._finalizer()  # hooks, optimizer hooks, capture workers, the pump: see __init__
            if self._pump is not None:
                self._failures.errors.extend(self._pump.errors)
            self._recorder.close()
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
        state = "closed" if self._closed else f"step {self._open.index}"
        return f"<gradscope.Monitor {self.mode} mode, every={self.every}, {len(self.rows)} rows, {state}>"
