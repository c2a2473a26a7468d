"""``Recorder`` and ``RecordSink`` alone (``gradscope.monitor.recorder``): real NumPy engines
over a tiny model, a run state, failures and a step clock, no monitor and no hooks.

A sampled step's rows become a ``Sampled`` record of per-layer rows equal to the float64
reference; a void step reads as absent (never zeros); every record reaches the run state and
the observer, except ``Failed`` records, which go to the run state only. Last, on a monitor:
a step whose capture fails to finish leaves nothing of its forward statistics behind.
"""

import warnings

import numpy as np
import pytest
import torch
from run_builders import run_info
from stats_reference import reference_layers
from torch import nn

import gradscope
from gradscope.distributed.topology import Topology
from gradscope.monitor.aggregate import RowGroups
from gradscope.monitor.engines import Engines
from gradscope.monitor.failures import Failures
from gradscope.monitor.recorder import Recorder, RecordSink
from gradscope.monitor.resources import StepClock
from gradscope.monitor.watched import layer_name, select
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats.reporting import GradscopeWarning


class Recording:
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.watched = select(self.model, None, "layer")
        self.params = self.watched.params
        self.engines = Engines(self.params, "numpy", "step", Topology("single"), lambda key: None)
        self.run = RunState(run_info(self.watched.row_names, numel=(40, 27)))
        self.sink = RecordSink(self.run, None)
        self.failures = Failures(1, True, self.sink.put)
        self.observed: list[records.Record] = []
        self.clock = StepClock(torch.device("cpu"))
        self.recorder = Recorder(
            self.engines,
            RowGroups(self.watched.row_of),
            Topology("single"),
            self.failures,
            self.sink,
            self.observed.append,
            self.clock,
        )

    def step(self, step: int, seed: int) -> dict:
        """One step measured at its end: the gradients, the captures closed, the loss ticked."""
        self.model.zero_grad()
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))
        self.model(x).square().mean().backward()
        grads = {name: p.grad.detach().clone() for name, p in self.model.named_parameters()}
        self.engines.add_all(self.params)
        self.recorder.finish(step, np.arange(len(self.params))[::-1].copy())
        self.clock.tick(step, {"loss": float(seed)})
        self.engines.reset()
        return grads


@pytest.fixture
def recording():
    """A :class:`Recording`; its engines are closed after the test."""
    rec = Recording()
    yield rec
    rec.engines.close()


def test_a_sampled_step_becomes_reference_layer_rows_seen_by_the_observer(recording):
    rec = recording
    grads = rec.step(0, seed=1)
    assert rec.recorder.in_flight() == (0,)
    rec.recorder.collect(block=True)
    assert rec.recorder.in_flight() == ()
    expected = reference_layers(grads, {name: layer_name(name) for name in grads})
    norms = rec.run.series("norm").values[0]
    for row, name in enumerate(rec.watched.row_names):
        np.testing.assert_allclose(norms[row], np.sqrt(expected[name]["sumsq"]), rtol=1e-6)
        assert rec.run.series("numel").values[0, row] == expected[name]["numel"]
    # parameters final in the order 3, 2, 1, 0: a layer's order is its first parameter's
    np.testing.assert_array_equal(rec.run.series("backward_order").values[0], [2, 0])
    kinds = [type(record) for record in rec.observed]
    assert kinds == [records.Sampled, records.StepValues]
    assert list(rec.run.series("loss").values) == [1.0]


def test_a_void_step_reads_as_absent_and_its_failure_is_not_observed(recording):
    rec = recording
    rec.step(0, seed=1)
    with pytest.warns(GradscopeWarning, match="monitoring failed at step 1"):
        rec.failures.fail(1, RuntimeError("capture lost"))
    rec.step(1, seed=2)
    rec.step(2, seed=3)
    rec.recorder.collect(block=True)
    present = rec.run.series("present").values
    assert present[0].all() and not present[1].any() and present[2].all()
    assert np.isnan(rec.run.series("norm").values[1]).all(), "absent, never zeros"
    assert list(rec.run.series("failed").values) == [False, True, False]
    assert not any(isinstance(record, records.Failed) for record in rec.observed)
    assert not rec.failures.is_void(1), "a recorded step is settled"


def test_a_step_another_rank_could_not_measure_is_void_here(recording):
    rec = recording
    rec.step(0, seed=1)
    rec.engines.captures["numpy"].completed = lambda block: [(0, None)]  # the rank's payload: unmeasured
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing failed here: no warning
        rec.recorder.collect(block=True)
    assert not rec.run.series("present").values[0].any()
    assert list(rec.run.series("failed").values) == [True]
    assert rec.failures.errors == []


def test_metrics_go_through_emit_to_the_run_and_the_observer(recording):
    rec = recording
    rec.recorder.emit(records.Metrics(0, {"val_loss": 0.5}))
    assert list(rec.run.series("val_loss").values) == [0.5]
    assert rec.observed == [records.Metrics(0, {"val_loss": 0.5})]


def test_a_capture_that_fails_to_finish_closes_the_steps_forward_statistics_too():
    """The step is void, forward statistics included: none of its activations may be counted
    in the next sampled step (each step's forward rows equal those of a run without the
    failure), and in a distributed run its forward collectives are still issued."""

    def forward_numel(fail_at: int | None):
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        with gradscope.watch(model, forward=True, backend="numpy") as mon:
            capture = next(iter(mon._engines.captures.values()))
            original = capture.finish

            def finish(step, failed=False):
                original(step, failed=failed)
                if step == fail_at:
                    raise RuntimeError("finish failed")

            capture.finish = finish
            for step in range(4):
                x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
                model(x).square().mean().backward()
                mon.step()
                model.zero_grad()
            numel = mon.history("forward_numel")
            return list(numel.steps), numel.values, list(mon.history("failed").values)

    steps, whole, failed = forward_numel(None)
    assert steps == [0, 1, 2, 3] and not any(failed)
    with pytest.warns(GradscopeWarning, match="finish failed"):
        steps, values, failed = forward_numel(1)
    assert steps == [0, 2, 3] and failed == [False, True, False, False]
    np.testing.assert_array_equal(values, whole[[0, 2, 3]])
