"""A run log's records read one at a time by a thread: in order, with read_log's checks, and a
thread that always ends (at the end of the log, on an error, or when the stream is closed)."""

import threading

import pytest
import run_builders

from gradscope.run import record_streams, records
from gradscope.run.logfile import RunLogError, segment_path
from gradscope.run.record_streams import RecordStream


def readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gradscope-read")]


def write(folder, *recs, header=True) -> None:
    info = run_builders.run_info(("a",), numel=4)
    lines = ([records.Header(info=info.to_dict(), thresholds={"sustain": 3})] if header else []) + list(recs)
    segment_path(folder, 0).write_text("".join(records.encode(r) + "\n" for r in lines), encoding="utf-8")


def test_records_come_in_order_then_what_read_log_returned(tmp_path):
    written = [records.StepValues(step, {"loss": float(step)}) for step in range(5)] + [records.Closed(5)]
    write(tmp_path, *written)
    with RecordStream(tmp_path) as stream:
        assert stream.info.rows == ("a",)
        assert stream.logged is None
        assert list(stream.records()) == written
        assert stream.logged.closed and stream.logged.thresholds == {"sustain": 3}
        assert stream.logged.files == [segment_path(tmp_path, 0)]
    assert not readers()


def test_a_log_without_a_header_fails_at_once_leaving_no_thread(tmp_path):
    write(tmp_path, records.Closed(0), header=False)
    with pytest.raises(RunLogError, match="not a gradscope run log"):
        RecordStream(tmp_path)
    assert not readers()


def test_a_corrupt_line_is_raised_by_the_reader(tmp_path):
    write(tmp_path, records.Closed(0))
    with open(segment_path(tmp_path, 0), "a", encoding="utf-8") as file:
        file.write("{}\n" + records.encode(records.Closed(1)) + "\n")
    with RecordStream(tmp_path) as stream, pytest.raises(RunLogError, match=":3: corrupt record"):
        list(stream.records())
    assert not readers()


def test_closing_mid_log_stops_a_thread_that_waits_on_a_full_queue(tmp_path, monkeypatch):
    monkeypatch.setattr(record_streams, "QUEUE_RECORDS", 2)
    write(tmp_path, *[records.StepValues(step, {"loss": 1.0}) for step in range(100)])
    stream = RecordStream(tmp_path)
    assert next(stream.records()).step == 0
    stream.close()
    assert not readers()
