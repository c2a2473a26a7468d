"""From measurements on their way to records: closing a sampled step, collecting what arrived.

Two parts of :class:`gradscope.Monitor`:

* :class:`RecordSink`, where every record goes: the run's state first, then the exporters
  (through the pump, off the training thread). It is given the two.
* :class:`Recorder`, the monitor's side of results in flight. At a sampled ``mon.step()`` it
  closes the step's captures (and DDP's all-reduce, and forward statistics), noting which
  sources must report; later (every ``mon.step()``, any read, ``close()``) it collects what
  has reached the host, turns a sampled step whose sources have all reported into per-row
  statistics (:mod:`gradscope.monitor.aggregate`) and emits records for them, for the step
  values of the step clock, forward statistics, DDP's extras and tracked updates. It is
  given each of these sources, the row groups, the failures part (a void step reads as
  absent), the sink, and ``observe`` (the responder's look at each record it emits).

A :class:`~gradscope.run.records.Failed` record goes to the sink directly (from
:class:`~gradscope.monitor.failures.Failures`), as do the records of actions: the responder
observes measurements and metrics, not failures or its own actions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gradscope.distributed.topology import Topology
from gradscope.monitor.aggregate import LayerRows, RowGroups, blame_replicas
from gradscope.monitor.engines import Engines
from gradscope.monitor.failures import Failures
from gradscope.monitor.forward import ForwardCapture
from gradscope.monitor.replicated import DdpExtras
from gradscope.monitor.resources import StepClock
from gradscope.monitor.updates import UpdateTracker
from gradscope.monitor.weights import WeightReader
from gradscope.outputs.pump import RecordPump
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats import layout


class RecordSink:
    """Where a monitor's records go: ``put(record)`` applies it to the run's state, then hands
    it to the exporters.

    Args:
        run: the run's state (history, events), read by ``history()``, ``report()``...
        pump: the thread feeding the exporters; None on a rank that exports nothing.
    """

    __slots__ = ("pump", "run")

    def __init__(self, run: RunState, pump: RecordPump | None) -> None:
        self.run = run
        self.pump = pump

    def put(self, record: records.Record) -> None:
        self.run.apply(record)
        if self.pump is not None:
            self.pump.put(record)


class Recorder:
    """Results in flight, collected into records (module docstring).

    Args:
        engines: the gradient captures.
        groups: which parameters make up each reported row.
        topology: how the model is spread over ranks (sharded rows were combined across
            ranks; DDP's non-finite rows are blamed on the ranks its hook saw).
        failures: which sampled steps are void (recorded as absent, never as zeros).
        sink: where records go.
        observe: called with every record after the sink (the responder screens it).
        clock: the per-step values, time, memory and energy.
        ddp: DDP's extras (its all-reduce per sampled step), or None.
        forward: forward statistics, or None.
        updates: update and weight norms, or None.
        weights: weight readings for compression readiness, or None.
    """

    def __init__(
        self,
        engines: Engines,
        groups: RowGroups,
        topology: Topology,
        failures: Failures,
        sink: RecordSink,
        observe: Callable[[records.Record], None],
        clock: StepClock,
        ddp: DdpExtras | None = None,
        forward: ForwardCapture | None = None,
        updates: UpdateTracker | None = None,
        weights: WeightReader | None = None,
    ) -> None:
        self._engines, self._groups, self._failures = engines, groups, failures
        self._sharded = topology.kind == "sharded"
        self._replicated = topology.kind == "replicated"
        self._sink, self._observe = sink, observe
        self._clock, self._ddp, self._forward, self._updates = clock, ddp, forward, updates
        self._weights = weights
        # Sampled steps whose results are on their way: step -> (present, order, sources, arrived).
        self._pending: dict[int, tuple[np.ndarray, np.ndarray, set, dict]] = {}

    def emit(self, record: records.Record) -> None:
        """Apply a record to the run's state, hand it to the exporters and the responder."""
        self._sink.put(record)
        self._observe(record)

    def finish(self, step: int, order: np.ndarray) -> None:
        """End sampled ``step``'s captures and issue its collectives (``order``: each watched
        parameter's backward order), then its forward statistics. In a distributed run every
        rank issues the same collectives at every sampled step, whatever happened locally (a
        failure here only voids the step), so that no rank waits forever.

        Raises:
            Exception: the first error met, once everything is closed (the forward statistics
                too, as failed: none of this step's activations may count in a later step).
        """
        failed = self._failures.is_void(step)
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
        self._pending[step] = (self._engines.present.copy(), order.copy(), sources, {})
        if self._forward is not None:
            self._forward.finish(step, failed=bool(errors) or self._failures.is_void(step))
        if errors:
            raise errors[0]

    def in_flight(self) -> tuple[int, ...]:
        """Sampled steps whose statistics have not all reached the host."""
        forward = self._forward.pending if self._forward is not None else ()
        return tuple(sorted({*self._pending, *forward}))

    def collect(self, block: bool, steps_at_least: int = 1) -> None:
        """Record what has reached the host (with ``block``, wait for everything in flight);
        the step clock's values wait until ``steps_at_least`` steps have them."""
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
                self.emit(record)
        for record in self._clock.completed(block, steps_at_least):
            values = {"step_time": record.step_time, "peak_memory": record.peak_memory, "energy": record.energy}
            self.emit(records.StepValues(record.step, {**values, **record.values}))
        if self._updates is not None:
            for step, weight_sq, update_sq in self._updates.completed(block):
                self.emit(records.Updates(step, self._groups.sum(weight_sq), self._groups.sum(update_sq)))
        if self._weights is not None:
            row_of = np.asarray(self._groups.row_of, dtype=np.int64)
            for step, rows, taylor in self._weights.completed(block):
                self.emit(records.Weights(step, rows, row_of, self._weights.ndim, taylor[:, 0], taylor[:, 1]))

    def _record_sampled(self, step: int, present: np.ndarray, order: np.ndarray, arrived: dict) -> None:
        replica = arrived.pop("replicas", None)
        if replica is not None:
            for record in self._ddp.records(step, replica, self._groups.row_of):
                self.emit(record)
        if any(payload is None for payload in arrived.values()):
            self._failures.fail_elsewhere(step)  # another rank could not measure this step
        if self._failures.settle(step):
            present = np.zeros_like(present)
        param_rows, rank, ranks = self._engines.param_rows(arrived)
        if self._sharded and present.any():
            present = present | (param_rows[:, layout.NUMEL] > 0)  # another rank held this gradient
        if not present.any():  # no gradient at all this step (e.g. mon.step() without backward)
            n_rows = self._groups.rows
            layer = LayerRows(np.zeros((n_rows, layout.ROW_WIDTH)), np.zeros(n_rows, bool), np.full(n_rows, -1))
        elif self._sharded:
            layer = self._groups.combine(param_rows, present, order, rank, ranks)
        else:
            layer = self._groups.combine(param_rows, present, order)
            if self._replicated:
                layer = blame_replicas(layer, replica.nonfinite_ranks if replica is not None else ())
        self.emit(
            records.Sampled(step, layer.rows, layer.present, layer.order, layer.nonfinite_rank, layer.nonfinite_ranks)
        )

    def close(self) -> None:
        """Drop what is still in flight (after a last blocking :meth:`collect`)."""
        self._pending.clear()
