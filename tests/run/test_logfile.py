"""The run-log reader alone, on log files written by hand with ``records.encode``.

Covers ``read_log`` of a directory and of a single file, the ``LoggedRun`` it returns
(state, thresholds, ``closed``, files, ``first_segment``), every way a log is refused
(``RunLogError``), torn last lines and missing segments (warnings), reading within the
history's memory budget (what is kept equals the live state; the peak memory of a long log),
``check_log_dir`` and ``segment_path``. Logs written by the monitor itself are tested in tests/outputs/test_runlog.py.
"""

import dataclasses
import fnmatch
import tracemalloc
import warnings

import numpy as np
import pytest
import run_builders

from gradscope.run import records
from gradscope.run.info import RunInfo
from gradscope.run.logfile import PATTERN, LoggedRun, RunLogError, check_log_dir, read_log, segment_path
from gradscope.run.state import RunState
from gradscope.stats import layout

NAMES = ("a", "b", "c")
N_ROWS = len(NAMES)
THRESHOLDS = {"explode_ratio": 12.5, "vanish_norm": 1e-7}


def run_info(rows=NAMES) -> RunInfo:
    return run_builders.run_info(rows, numel=16, summary={"parameters": 48}, history=50, hist_history=10)


def header(segment=0, schema=records.SCHEMA, thresholds=THRESHOLDS, info=None) -> records.Header:
    info = run_info().to_dict() if info is None else info
    return records.Header(info=info, thresholds=thresholds, segment=segment, schema=schema)


def sampled(step, n=N_ROWS, sumsq=4.0) -> records.Sampled:
    rows = np.zeros((n, layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = 16
    rows[:, layout.SUMSQ] = sumsq
    return records.Sampled(step, rows, np.ones(n, bool), np.arange(n))


def lines_of(*recs) -> str:
    return "".join(records.encode(r) + "\n" for r in recs)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def write_segment(directory, index, *recs, **header_kw):
    return write(segment_path(directory, index), lines_of(header(segment=index, **header_kw), *recs))


def body(first_step=0, steps=3) -> list:
    out = []
    for step in range(first_step, first_step + steps):
        out.append(sampled(step, sumsq=float(step + 1) ** 2))
        out.append(records.StepValues(step, {"loss": 1.0 / (step + 1), "lr": 0.1}))
    return out


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---- reading ----------------------------------------------------------------------------


def test_read_a_directory(tmp_path, no_warnings):
    write_segment(tmp_path, 0, *body(), records.Metrics(2, {"val_loss": 0.5}), records.Closed(3))
    run = read_log(tmp_path)
    assert isinstance(run, LoggedRun)
    assert run.files == [tmp_path / "gradscope-00000.jsonl"]
    assert run.closed is True
    assert run.thresholds == THRESHOLDS
    assert run.first_segment == 0
    assert run.state.info == run_info()
    norm = run.state.series("norm")
    assert norm.steps.tolist() == [0, 1, 2] and norm.rows == NAMES
    np.testing.assert_array_equal(norm.values, [[1.0] * 3, [2.0] * 3, [3.0] * 3])
    np.testing.assert_array_equal(run.state.series("loss").values, [1.0, 0.5, 1.0 / 3])
    np.testing.assert_array_equal(run.state.series("lr").values, [0.1] * 3)
    np.testing.assert_array_equal(run.state.series("val_loss").values, [np.nan, np.nan, 0.5])


def test_read_a_single_file(tmp_path, no_warnings):
    file = write(tmp_path / "anything.log", lines_of(header(), *body(steps=2)))
    run = read_log(file)
    assert run.files == [file]
    assert run.closed is False  # no Closed record: the process died
    assert run.state.series("loss").steps.tolist() == [0, 1]


def test_a_single_segment_file_of_a_directory_reads_only_that_file(tmp_path, no_warnings):
    write_segment(tmp_path, 0, *body(0, 2))
    second = write_segment(tmp_path, 1, *body(2, 2), records.Closed(4))
    run = read_log(second)
    assert run.files == [second]
    assert run.first_segment == 1 and run.closed is True
    assert run.state.series("loss").steps.tolist() == [2, 3]


def test_segments_read_in_order_as_one_run(tmp_path, no_warnings):
    write_segment(tmp_path, 1, *body(2, 2), records.Closed(4))
    write_segment(tmp_path, 0, *body(0, 2))
    (tmp_path / "notes.txt").write_text("not part of the log")
    run = read_log(tmp_path)
    assert [f.name for f in run.files] == ["gradscope-00000.jsonl", "gradscope-00001.jsonl"]
    assert run.state.series("norm").steps.tolist() == [0, 1, 2, 3]
    assert run.closed is True and run.first_segment == 0


def test_first_segment_after_the_oldest_files_were_deleted(tmp_path, no_warnings):
    write_segment(tmp_path, 3, *body(30, 2))
    write_segment(tmp_path, 4, *body(32, 1))
    run = read_log(tmp_path)
    assert run.first_segment == 3
    assert run.closed is False
    assert run.state.series("loss").steps.tolist() == [30, 31, 32]


def test_thresholds_come_from_the_header_and_default_to_empty(tmp_path):
    write(tmp_path / "x.jsonl", lines_of(header(thresholds={}), *body(steps=1)))
    assert read_log(tmp_path / "x.jsonl").thresholds == {}
    write(tmp_path / "y.jsonl", lines_of(header(thresholds={"nonfinite": 0}), *body(steps=1)))
    assert read_log(tmp_path / "y.jsonl").thresholds == {"nonfinite": 0}


def test_closed_only_when_a_closed_record_is_in_the_log(tmp_path):
    write(tmp_path / "open.jsonl", lines_of(header(), *body(steps=2), records.Failed(1)))
    assert read_log(tmp_path / "open.jsonl").closed is False
    write(tmp_path / "closed.jsonl", lines_of(header(), *body(steps=2), records.Closed(2)))
    assert read_log(tmp_path / "closed.jsonl").closed is True


def test_a_header_only_log_is_an_empty_run(tmp_path, no_warnings):
    run = read_log(write(tmp_path / "h.jsonl", lines_of(header())))
    assert run.closed is False
    assert run.state.history.latest_sampled() == -1
    assert len(run.state.series("loss")) == 0


# ---- refused logs -----------------------------------------------------------------------


def test_an_empty_file_is_refused(tmp_path):
    file = write(tmp_path / "gradscope-00000.jsonl", "")
    with pytest.raises(RunLogError, match="empty"):
        read_log(tmp_path)
    with pytest.raises(RunLogError, match="empty"):
        read_log(file)


@pytest.mark.parametrize(
    "first_line",
    [
        "hello world\n",
        '{"some": "json"}\n',
        "[1, 2, 3]\n",
        records.encode(records.StepValues(0, {"loss": 1.0})) + "\n",
        records.encode(records.Closed(3)) + "\n",
    ],
)
def test_a_foreign_first_line_is_refused(tmp_path, first_line):
    file = write(tmp_path / "f.jsonl", first_line + lines_of(*body(steps=1)))
    with pytest.raises(RunLogError, match=r"f\.jsonl:1: not a gradscope run log"):
        read_log(file)


def test_non_utf8_is_refused(tmp_path):
    file = tmp_path / "gradscope-00000.jsonl"
    file.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(RunLogError, match="not UTF-8"):
        read_log(file)


def test_a_newer_schema_is_refused(tmp_path):
    file = write(tmp_path / "new.jsonl", lines_of(header(schema=records.SCHEMA + 1), *body(steps=1)))
    with pytest.raises(RunLogError, match=f"newer gradscope \\(log schema {records.SCHEMA + 1}\\)"):
        read_log(file)


def test_an_older_schema_is_read(tmp_path, no_warnings):
    file = write(tmp_path / "old.jsonl", lines_of(header(schema=1), *body(steps=2)))
    assert read_log(file).state.series("loss").steps.tolist() == [0, 1]


def test_a_header_that_does_not_describe_a_run_is_refused(tmp_path):
    file = write(tmp_path / "h.jsonl", lines_of(header(info={"rows": ["a"]}), *body(steps=1)))
    with pytest.raises(RunLogError, match=r"h\.jsonl:1: the header does not describe a run"):
        read_log(file)


@pytest.mark.parametrize("bad", ["{not json", '{"t": "mystery", "step": 1}', '{"t": "step", "v": {}}', "42"])
def test_a_corrupt_middle_line_names_its_file_and_line(tmp_path, bad):
    text = lines_of(header(), *body(steps=1)) + bad + "\n" + lines_of(*body(1, 1))
    write(tmp_path / "gradscope-00000.jsonl", text)
    with pytest.raises(RunLogError, match=r"gradscope-00000\.jsonl:4: corrupt record"):
        read_log(tmp_path)


def test_a_corrupt_line_in_a_later_segment_names_that_file(tmp_path):
    write_segment(tmp_path, 0, *body(0, 2))
    second = segment_path(tmp_path, 1)
    write(second, lines_of(header(segment=1), *body(2, 1)) + "garbage\n" + lines_of(*body(3, 1)))
    with pytest.raises(RunLogError) as caught:
        read_log(tmp_path)
    assert f"{second}:4: corrupt record" in str(caught.value)


def test_a_header_in_the_middle_of_a_file_is_refused(tmp_path):
    file = write(tmp_path / "m.jsonl", lines_of(header(), sampled(0), header(segment=1), sampled(1)))
    with pytest.raises(RunLogError, match=r"m\.jsonl:3: a header in the middle of a file"):
        read_log(file)


@pytest.mark.parametrize("n_rows", [2, 4, 0])
def test_a_sampled_record_of_another_row_count_is_refused(tmp_path, n_rows):
    file = write(tmp_path / "s.jsonl", lines_of(header(), sampled(0), sampled(1, n=n_rows)))
    with pytest.raises(RunLogError, match=r"s\.jsonl:3: corrupt record \(a sampled step with shapes .* of 3 rows\)"):
        read_log(file)


def test_update_norms_of_another_row_count_are_refused(tmp_path):
    updates = records.Updates(0, np.ones(5), np.ones(5))
    file = write(tmp_path / "u.jsonl", lines_of(header(), sampled(0), updates))
    with pytest.raises(RunLogError, match=r"u\.jsonl:3: corrupt record \(update norms of shape \(5,\)"):
        read_log(file)


# ---- torn lines and missing segments ----------------------------------------------------


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    cut = records.encode(records.StepValues(2, {"loss": 0.25}))
    write(tmp_path / "gradscope-00000.jsonl", lines_of(header(), *body(steps=2)) + cut[: len(cut) // 2])
    with pytest.warns(RuntimeWarning, match=r"torn last line of .*gradscope-00000\.jsonl:6") as caught:
        run = read_log(tmp_path)
    assert len(caught) == 1
    assert run.state.series("loss").steps.tolist() == [0, 1]
    assert run.closed is False


def test_a_complete_record_without_its_newline_is_torn_too(tmp_path):
    whole = records.encode(records.StepValues(2, {"loss": 0.25}))  # valid JSON, but no "\n"
    file = write(tmp_path / "t.jsonl", lines_of(header(), *body(steps=2)) + whole)
    with pytest.warns(RuntimeWarning, match="cut short"):
        run = read_log(file)
    assert run.state.series("loss").steps.tolist() == [0, 1]


def test_a_torn_line_in_a_segment_that_is_not_the_last_is_corrupt(tmp_path):
    write(segment_path(tmp_path, 0), lines_of(header(), *body(0, 1)) + '{"t": "st')
    write_segment(tmp_path, 1, *body(1, 1))
    with pytest.raises(RunLogError, match=r"gradscope-00000\.jsonl:4: corrupt record"):
        read_log(tmp_path)


def test_a_missing_middle_segment_warns_and_keeps_the_rest(tmp_path):
    write_segment(tmp_path, 0, *body(0, 2))
    write_segment(tmp_path, 2, *body(5, 2), records.Closed(7))
    with pytest.warns(RuntimeWarning, match="gradscope-00002.jsonl is segment 2 but segment 1 is missing") as caught:
        run = read_log(tmp_path)
    assert len(caught) == 1
    assert run.state.series("loss").steps.tolist() == [0, 1, 5, 6]
    assert run.first_segment == 0 and run.closed is True


def test_a_corrupt_last_line_with_its_newline_is_skipped_as_torn(tmp_path):
    write(tmp_path / "gradscope-00000.jsonl", lines_of(header(), *body(steps=2)) + '{"t": "st\n')
    with pytest.warns(RuntimeWarning, match=r"torn last line of .*gradscope-00000\.jsonl:6") as caught:
        run = read_log(tmp_path)
    assert len(caught) == 1
    assert run.state.series("loss").steps.tolist() == [0, 1]


# ---- within the history's memory budget -------------------------------------------------


def budget_info(rows: int, history_mib: int) -> RunInfo:
    """A run asking for the default history (10 000 sampled steps, 100 with histograms) that
    ``history_mib`` shortens."""
    names = tuple(f"layer{i}" for i in range(rows))
    info = run_builders.run_info(names, numel=64, history=10_000, hist_history=100)
    return dataclasses.replace(info, history_mib=history_mib)


def random_sampled(step: int, rows: int, rng, histogram: bool) -> records.Sampled:
    """Light rows of random scalars (incompressible), full rows when ``histogram``."""
    values = np.full((rows, layout.ROW_WIDTH), layout.NO_HISTOGRAM)
    values[:, : layout.HIST] = rng.random((rows, layout.HIST))
    values[:, [layout.NANS, layout.INFS]] = 0
    if histogram:
        values[:, layout.HIST :] = rng.integers(0, 100, (rows, layout.NUM_BINS))
    return records.Sampled(step, values, rng.random(rows) < 0.9, rng.permutation(rows))


def test_the_kept_history_equals_the_live_one_and_the_budget_warns_once(tmp_path):
    """A log replayed into the same budget keeps exactly what the live state kept: the newest
    steps, the thinned older ones, the newest histograms."""
    info, rng = budget_info(rows=20, history_mib=1), np.random.default_rng(0)
    live = RunState(info)
    assert live.plan.shortened and live.plan.dense < live.plan.capacity  # thinned: the rule is exercised
    recs = []
    for step in range(600):
        recs.append(random_sampled(step, 20, rng, histogram=step % 8 == 0))
        recs.append(records.StepValues(step, {"loss": float(rng.random()), "lr": 0.1}))
    for record in recs:
        live.apply(record)
    write(tmp_path / "gradscope-00000.jsonl", lines_of(records.Header(info.to_dict()), *recs))
    with pytest.warns(RuntimeWarning, match=r"load_run\(\.\.\., history_mib=\d+\) or more") as caught:
        run = read_log(tmp_path)
    assert len(caught) == 1
    assert run.state.plan == live.plan
    kept = live.series("norm").steps
    assert 0 in kept and 599 in kept and 300 not in kept  # thinned: the oldest kept, a middle one not
    for name in live.fields():
        ours, theirs = run.state.series(name), live.series(name)
        np.testing.assert_array_equal(ours.steps, theirs.steps, err_msg=name)
        np.testing.assert_array_equal(ours.values, theirs.values, err_msg=name)


def test_history_mib_overrides_the_recorded_budget(tmp_path, no_warnings):
    info = budget_info(rows=20, history_mib=1)
    write(tmp_path / "gradscope-00000.jsonl", lines_of(records.Header(info.to_dict()), sampled(0, n=20)))
    run = read_log(tmp_path, history_mib=64)
    assert run.state.info.history_mib == 64 and not run.state.plan.shortened
    assert run.state.plan.capacity == 10_000


def test_a_long_log_is_read_line_by_line_within_the_budget(tmp_path):
    """Reading holds the budgeted history and about one line: never the whole file.

    The bound: the history's own bytes (``plan.nbytes``), and while one line is applied the
    line itself and, for its record, no more than 6 arrays of the record's float64 ``(rows,
    ROW_WIDTH)`` size (the decompressed bytes, the rows, the histogram columns cleaned and
    placed), 4 lines' worth for the reader's buffers and the decoding, and 1 MiB for the
    interpreter. The log here is more than twice that (19 MB of lines): reading it whole
    (``readlines()``), as before, exceeds the bound by the file's size.
    """
    rows, steps, rng = 1000, 400, np.random.default_rng(1)
    info = budget_info(rows, history_mib=4)
    longest = 0
    with open(tmp_path / "gradscope-00000.jsonl", "w", encoding="utf-8") as handle:
        handle.write(records.encode(records.Header(info.to_dict())) + "\n")
        for step in range(steps):
            line = records.encode(random_sampled(step, rows, rng, histogram=step % 32 == 0))
            longest = max(longest, len(line))
            handle.write(line + "\n" + records.encode(records.StepValues(step, {"loss": 1.0})) + "\n")
    size = (tmp_path / "gradscope-00000.jsonl").stat().st_size
    tracemalloc.start()
    try:
        with pytest.warns(RuntimeWarning, match="history_mib=4 keeps"):
            run = read_log(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    plan = run.state.plan
    assert plan.nbytes <= 4 * 2**20
    bound = plan.nbytes + 6 * rows * layout.ROW_WIDTH * 8 + 4 * longest + 2**20
    assert size > 2 * bound  # the test can tell streaming from reading the file whole
    assert peak < bound, f"peak {peak} bytes reading a {size}-byte log; bound {bound}"
    assert run.state.series("norm").steps[-1] == steps - 1


# ---- the log directory ------------------------------------------------------------------


def test_segment_path_matches_the_pattern(tmp_path):
    assert segment_path(tmp_path, 0) == tmp_path / "gradscope-00000.jsonl"
    assert segment_path(tmp_path, 123) == tmp_path / "gradscope-00123.jsonl"
    assert fnmatch.fnmatch(segment_path(tmp_path, 99999).name, PATTERN)


def test_check_log_dir_accepts_a_new_directory_without_making_it_and_one_without_a_log(tmp_path):
    """Checking makes nothing: a watch() that fails after the check leaves no directory behind
    (the run log makes it when it starts)."""
    new = tmp_path / "runs" / "x"
    assert check_log_dir(new) == new and not new.exists()
    new.mkdir(parents=True)
    (new / "other.jsonl").write_text("{}\n")
    assert check_log_dir(str(new)) == new


def test_check_log_dir_refuses_a_directory_holding_a_log(tmp_path):
    write_segment(tmp_path, 0)
    with pytest.raises(FileExistsError, match="already holds a gradscope run log"):
        check_log_dir(tmp_path)


def test_check_log_dir_refuses_a_file(tmp_path):
    file = write(tmp_path / "plain", "x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_log_dir(file)


# ---- known gaps (see the reasons) -------------------------------------------------------


def test_a_closed_record_followed_by_more_records_does_not_end_the_log(tmp_path):
    file = write(tmp_path / "c.jsonl", lines_of(header(), *body(0, 1), records.Closed(1), *body(1, 2)))
    run = read_log(file)
    assert run.state.series("loss").steps.tolist() == [0, 1, 2]
    assert run.closed is False


def test_a_torn_header_of_the_newest_segment_is_skipped(tmp_path):
    write_segment(tmp_path, 0, *body(0, 2))
    text = records.encode(header(segment=1))
    write(segment_path(tmp_path, 1), text[:40])  # killed while the rotated file's header was written
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = read_log(tmp_path)
    assert [str(w.message) for w in caught if "torn" in str(w.message)]
    assert run.state.series("loss").steps.tolist() == [0, 1]
