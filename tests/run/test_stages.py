"""Joining a pipeline's stage logs into one run, on logs written by hand with ``records.encode``.

Each test writes one log per stage (a header whose ``extra["pipeline"]`` says which stage)
and reads the directory with ``load_run``; the expected run is built independently, by
applying the records of the whole model to a ``RunState`` of every row. Real stage logs,
written by monitors of a real pipeline schedule, are tested in tests/distributed/test_pipeline.py.
"""

import threading
import warnings

import numpy as np
import pytest
import run_builders

import gradscope
from gradscope.run import records, stages
from gradscope.run.logfile import RunLogError, segment_path
from gradscope.run.state import RunState
from gradscope.stats import layout

ROWS = (("a", "b"), ("c",))
"""Each stage's rows: stage 0 has 'a' and 'b', stage 1 has 'c'."""


def info(stage: int, rows=None, ranks=(0, 1), **options):
    rows = ROWS[stage] if rows is None else rows
    extra = {
        "pipeline": {"stage": stage, "stages": len(ranks), "ranks": list(ranks)},
        "distributed": {"kind": "single", "world": 2, "rank": ranks[stage], "global_rank": ranks[stage]},
    }
    return run_builders.run_info(rows, numel=4, summary={"parameters": 4 * len(rows)}, extra=extra, **options)


def sampled(step: int, sumsq, present=None, order=None) -> records.Sampled:
    sumsq = np.asarray(sumsq, dtype=np.float64)
    rows = np.zeros((len(sumsq), layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = 4
    rows[:, layout.SUMSQ] = sumsq
    rows[:, layout.MAX_ABS] = np.sqrt(sumsq)
    present = np.ones(len(sumsq), bool) if present is None else np.asarray(present)
    order = np.full(len(sumsq), -1) if order is None else np.asarray(order)
    return records.Sampled(step, rows, present, order)


def write_log(folder, run_info, *recs, torn: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [records.Header(info=run_info.to_dict(), thresholds={"sustain": 2}), *recs]
    text = "".join(records.encode(r) + "\n" for r in lines) + torn
    segment_path(folder, 0).write_text(text, encoding="utf-8")


def stage_records(stage: int, steps: int = 3, closed: bool = True) -> list:
    """Stage 0: rows with sumsq (step+1, 2(step+1)); stage 1: 3(step+1). Every stage measures
    its step time, memory and energy; only the last has the loss."""
    out = []
    for step in range(steps):
        k = step + 1.0
        if stage == 0:
            out.append(sampled(step, [k, 2 * k]))
            out.append(records.StepValues(step, {"step_time": 1.0, "peak_memory": 10.0, "energy": 2.0}))
        else:
            out.append(sampled(step, [3 * k]))
            values = {"loss": 1 / k, "step_time": 3.0, "peak_memory": 5.0, "energy": 1.0}
            out.append(records.StepValues(step, values))
    if closed:
        out.append(records.Closed(steps))
    return out


def whole_model(steps: int = 3) -> RunState:
    """The expected run: the whole model's records applied to one state of rows a, b, c."""
    state = RunState(run_builders.run_info(("a", "b", "c"), numel=4))
    for step in range(steps):
        k = step + 1.0
        state.apply(sampled(step, [k, 2 * k, 3 * k]))
        values = {"loss": 1 / k, "step_time": 3.0, "peak_memory": 10.0, "energy": 3.0}
        state.apply(records.StepValues(step, values))
    return state


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_the_stages_logs_read_as_one_run_of_every_row(tmp_path, no_warnings):
    for stage in (0, 1):
        write_log(tmp_path / f"stage-{stage:05d}", info(stage), *stage_records(stage))
    run = gradscope.load_run(tmp_path)
    expected = whole_model()
    assert run.rows == ("a", "b", "c") and run.closed
    assert run.summary["parameters"] == 12
    assert run.info.extra["pipeline"] == {"stages": 2, "ranks": [0, 1], "stage_rows": [2, 1]}
    assert run.files == [
        tmp_path / "stage-00000" / "gradscope-00000.jsonl",
        tmp_path / "stage-00001" / "gradscope-00000.jsonl",
    ]
    for field in ("sumsq", "norm", "max_abs", "present", "loss", "step_time", "peak_memory", "energy"):
        np.testing.assert_array_equal(run.history(field).values, expected.series(field).values, err_msg=field)
    for step in range(3):
        assert run.stats(step).total_norm == pytest.approx(np.sqrt(6 * (step + 1)), rel=1e-12)
    assert [layer.name for layer in run.report().layers] == ["a", "b", "c"]


def test_a_stage_alone_is_a_run_of_its_rows(tmp_path, no_warnings):
    write_log(tmp_path / "stage-00001", info(1), *stage_records(1))
    assert gradscope.load_run(tmp_path / "stage-00001").rows == ("c",)


def test_a_step_a_stage_lacks_is_failed_never_a_partial_model(tmp_path):
    """Stage 1's log ends after step 1 (its process died): step 2 is read as failed, with one
    warning, and the run is not closed."""
    write_log(tmp_path / "stage-00000", info(0), *stage_records(0))
    write_log(tmp_path / "stage-00001", info(1), *stage_records(1, steps=2, closed=False))
    with pytest.warns(gradscope.GradscopeWarning, match="1 sampled steps .the first: 2. are missing"):
        run = gradscope.load_run(tmp_path)
    assert not run.closed
    assert run.history("failed").values.tolist() == [False, False, True]
    assert run.history("norm").steps.tolist() == [0, 1]


def test_a_failure_in_one_stage_voids_the_whole_step(tmp_path, no_warnings):
    """A stage that failed at step 1 writes Failed(1) and a step with no row present; the other
    stage measured it: the whole model's step 1 has no row (as one monitor voids a step)."""
    write_log(tmp_path / "stage-00000", info(0), *stage_records(0))
    failing = stage_records(1)
    failing[2:3] = [records.Failed(1), sampled(1, [6.0], present=[False])]
    write_log(tmp_path / "stage-00001", info(1), *failing)
    run = gradscope.load_run(tmp_path)
    present = run.history("present")
    assert run.history("failed").values.tolist() == [False, True, False]
    assert present.values[1].tolist() == [False, False, False]
    assert present.values[0].all() and present.values[2].all()


def test_backward_order_puts_the_last_stage_first(tmp_path, no_warnings):
    """Backward runs from the last stage to the first: a stage's order follows the measured
    rows of every later stage."""
    write_log(tmp_path / "stage-00000", info(0), sampled(0, [1.0, 2.0], order=[1, 0]))
    write_log(tmp_path / "stage-00001", info(1), sampled(0, [3.0], order=[0]))
    assert gradscope.load_run(tmp_path).history("backward_order").values[0].tolist() == [2, 1, 0]


def test_update_norms_and_disagreeing_replicas_keep_their_rows(tmp_path, no_warnings):
    """Update norms join side by side; a Desync record's rows move by its stage's first row."""
    weight = [np.array([1.0, 4.0]), np.array([9.0])]
    for stage in (0, 1):
        recs = [
            sampled(0, [1.0] * len(ROWS[stage])),
            records.Updates(0, weight[stage], weight[stage] / 100),
            *([records.Desync(0, (0,), (1,))] if stage == 1 else []),
        ]
        write_log(tmp_path / f"stage-{stage:05d}", info(stage, track_updates=True), *recs)
    run = gradscope.load_run(tmp_path)
    assert run.history("weight_norm").values[0].tolist() == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(run.history("update_ratio").values[0], [0.1, 0.1, 0.1])
    assert [event.rows for event in run._state.desync_events] == [(2,)]


@pytest.mark.parametrize("missing", [None, 1, (0, 3)])
def test_with_every_rank_logging_one_complete_pipeline_is_read(tmp_path, no_warnings, missing):
    """log_rank=None with 2 pipelines of 2 stages, (0, 1) and (2, 3): the complete pipeline of
    the lowest rank is read (its loss, not the other pipeline's): (0, 1), or (2, 3) when rank
    1's log is missing; with no complete pipeline, a log of each stage (the replicas' rows are
    the same)."""
    logs = {0: (0, (0, 1), None), 1: (1, (0, 1), 5.0), 2: (0, (2, 3), None), 3: (1, (2, 3), 7.0)}
    for rank, (stage, ranks, loss) in logs.items():
        if rank not in (missing if isinstance(missing, tuple) else (missing,)):
            recs = [sampled(0, [1.0] * len(ROWS[stage])), records.StepValues(0, {} if loss is None else {"loss": loss})]
            write_log(tmp_path / f"rank-{rank:05d}", info(stage, ranks=ranks), *recs)
    run = gradscope.load_run(tmp_path)
    assert run.rows == ("a", "b", "c")
    read = {None: (0, 1), 1: (2, 3), (0, 3): (2, 1)}[missing]
    assert run.history("loss").values.tolist() == [logs[read[1]][2]]
    assert [f.parent.name for f in run.files] == [f"rank-{rank:05d}" for rank in read]


def test_a_stage_without_a_log_is_an_error_naming_it(tmp_path):
    write_log(tmp_path / "stage-00000", info(0), *stage_records(0))
    with pytest.raises(RunLogError, match=r"stage 1 has no log here \(found stages \[0\]\)"):
        gradscope.load_run(tmp_path)


def test_folders_of_logs_that_are_no_stages_are_refused_as_before(tmp_path):
    for rank in (0, 1):
        folder = tmp_path / f"rank-{rank:05d}"
        folder.mkdir()
        text = records.encode(records.Header(info=run_builders.run_info(("a",), numel=4).to_dict())) + "\n"
        segment_path(folder, 0).write_text(text, encoding="utf-8")
    assert stages.stage_logs(tmp_path) is None
    with pytest.raises(RunLogError, match="no gradscope run log here"):
        gradscope.load_run(tmp_path)


@pytest.mark.parametrize("clash", ["rows", "every"])
def test_stages_that_are_no_one_model_are_refused(tmp_path, clash):
    write_log(tmp_path / "stage-00000", info(0), *stage_records(0))
    other = info(1, rows=("a",)) if clash == "rows" else info(1, every=2)
    write_log(tmp_path / "stage-00001", other, *stage_records(1))
    message = "rows named \\['a'\\]" if clash == "rows" else "disagree on every"
    with pytest.raises(RunLogError, match=message):
        gradscope.load_run(tmp_path)
    assert not [t for t in threading.enumerate() if t.name.startswith("gradscope-read")]


def test_a_torn_last_line_warns_and_a_corrupt_one_fails_leaving_no_reader(tmp_path):
    write_log(tmp_path / "stage-00000", info(0), *stage_records(0))
    write_log(tmp_path / "stage-00001", info(1), *stage_records(1, closed=False), torn='{"t": "ste')
    with pytest.warns(gradscope.GradscopeWarning, match="torn last line"):
        assert gradscope.load_run(tmp_path).rows == ("a", "b", "c")
    write_log(tmp_path / "stage-00001", info(1), *stage_records(1), torn='{"t": "step"}\n{}\n')
    with pytest.raises(RunLogError, match="corrupt record"):
        gradscope.load_run(tmp_path)
    assert not [t for t in threading.enumerate() if t.name.startswith("gradscope-read")]


def test_step_values_combine_as_declared():
    """step_time and peak_memory: the largest; energy: summed; anything else the stages both
    give: the last stage's (the loss lives there)."""
    first = {"step_time": 1.0, "energy": 2.0, "lr": 0.1, "loss": 9.0}
    joined = stages._step_values(4, [first, {"step_time": 3.0, "energy": 1.0, "loss": 0.5}])
    assert joined == records.StepValues(4, {"step_time": 3.0, "energy": 3.0, "lr": 0.1, "loss": 0.5})
    assert set(stages.STEP_VALUE_COMBINE) <= {"step_time", "peak_memory", "energy"}
