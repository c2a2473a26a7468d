"""``Acting`` alone (``gradscope.monitor.acting``): a real ``Responder`` over a run state fed by
hand, its action records and errors going to lists, no monitor and no training loop.

Records reach it as they reach a monitor's: applied to the run's state, then observed.
"""

import numpy as np
from run_builders import run_info
from torch import nn

from gradscope.actions.early_stopping import EarlyStopping
from gradscope.actions.halting import TrainingHalted
from gradscope.health.report import assess
from gradscope.monitor import acting as acting_module
from gradscope.monitor.acting import Acting
from gradscope.monitor.options import WatchOptions
from gradscope.monitor.watched import select
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats import layout


class Acted:
    """An ``Acting`` over a tiny model's rows, with its published records and reported errors."""

    def __init__(self, **options) -> None:
        self.options = WatchOptions(**options)
        self.watched = select(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), None, "layer")
        self.run = RunState(run_info(self.watched.row_names, numel=(16, 10)))
        self.published: list[records.Record] = []
        self.errors: list[tuple[str, str]] = []
        self.part = Acting(
            self.options,
            self.watched,
            self.options.thresholds,
            self.run,
            self.published.append,
            lambda key, message: self.errors.append((key, message)),
        )

    def feed(self, record: records.Record) -> None:
        self.run.apply(record)
        self.part.observe(record)

    def sampled(self, step: int, nans: tuple[int, int] = (0, 0)) -> None:
        rows = np.zeros((2, layout.ROW_WIDTH))
        rows[:, layout.NUMEL] = (16, 10)
        rows[:, layout.SUMSQ] = 1.0
        rows[:, layout.MAX_ABS] = 0.5
        rows[:, layout.NANS] = nans
        rows[:, layout.HIST] = rows[:, layout.NUMEL] - rows[:, layout.NANS]
        self.feed(records.Sampled(step, rows, np.ones(2, bool), np.array([1, 0])))
        self.feed(records.StepValues(step, {"loss": 1.0}))

    def respond(self, step: int) -> TrainingHalted | None:
        return self.part.respond(step, lambda: assess(self.run, self.options.thresholds, ()))


def test_without_actions_there_is_no_responder_and_every_read_out_is_neutral():
    acted = Acted()
    part = acted.part
    assert part.responder is None and not part.acts
    acted.sampled(0, nans=(3, 0))
    assert acted.respond(0) is None
    assert (part.should_stop, part.stop_reason, part.best_step, part.best_value) == (False, None, None, None)
    assert part.halted is None and part.lr_scale == 1.0
    assert part.state_dict() == {}
    part.load_state_dict({"early_stopping": {}})  # nothing to restore: ignored
    assert acted.published == [] and acted.errors == []


def test_a_nan_halts_at_its_step_with_the_report_and_a_halt_record():
    acted = Acted(halt_on="nonfinite")
    for step in range(3):
        acted.sampled(step)
        assert acted.respond(step) is None
    acted.sampled(3, nans=(0, 2))
    halt = acted.respond(3)
    assert isinstance(halt, TrainingHalted) and halt.step == 3
    assert halt.finding.kind == "nonfinite" and halt.finding.layer == acted.watched.row_names[1]
    assert halt.report is not None and halt.report.status == "critical"
    assert acted.part.halted is halt
    (action,) = acted.published
    assert (action.step, action.action) == (3, "halt")
    assert acted.errors == []


def test_early_stopping_publishes_its_stop_and_its_state_restores_the_read_outs():
    acted = Acted(early_stopping=EarlyStopping(patience=2))
    for step, value in enumerate([1.0, 0.8, 0.9, 0.95]):
        acted.feed(records.Metrics(step, {"val_loss": value}))
    part = acted.part
    assert part.should_stop and (part.best_step, part.best_value) == (1, 0.8)
    assert "val_loss has not improved for 2 evaluations" in part.stop_reason
    (action,) = acted.published
    assert (action.step, action.action) == (3, "stop")

    resumed = Acted(early_stopping=EarlyStopping(patience=2))
    resumed.part.load_state_dict(part.state_dict())
    read_outs = ("should_stop", "stop_reason", "best_step", "best_value")
    assert [getattr(resumed.part, name) for name in read_outs] == [getattr(part, name) for name in read_outs]


def test_a_failure_of_acting_is_reported_never_raised(monkeypatch):
    acted = Acted(halt_on="critical")
    acted.part.responder.cadence.budget = 1e9  # judge at every step

    def broken_view(state, thresholds):
        raise RuntimeError("view unreadable")

    monkeypatch.setattr(acting_module, "view_of", broken_view)
    acted.sampled(0)
    assert acted.respond(0) is None
    assert acted.errors == [("responder", "gradscope: acting on findings failed (RuntimeError: view unreadable)")]

    def broken_respond(*args):
        raise OSError("responder down")

    monkeypatch.setattr(acted.part.responder, "respond", broken_respond)
    acted.sampled(1)
    assert acted.respond(1) is None
    assert acted.errors[-1] == ("responder", "gradscope: acting on findings failed (OSError: responder down)")
    assert acted.published == []
