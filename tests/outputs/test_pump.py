"""``RecordPump``: delivery of a run's records to exporters on a background thread.

Covers the call order (``start`` with the header, every record in order, then ``Closed``,
``flush`` and ``close``), periodic flushing, that calls happen off the calling thread, and
that an exporter that raises is dropped once, with one warning and a message in
``pump.errors``, while the others still get everything.
"""

import threading
import time
import warnings
from types import MappingProxyType

import pytest

from gradscope.outputs.exporters.base import Exporter
from gradscope.outputs.pump import RecordPump
from gradscope.run import records
from gradscope.stats.reporting import GradscopeWarning

HEADER = records.Header(info={"rows": ["a"]}, thresholds={"x": 1.0})
LONG = 60.0  # flush_seconds that never elapse during a test: only close() flushes


class Recorder(Exporter):
    """Remembers every call: (method, argument or None, thread ident, thread name)."""

    def __init__(self):
        self.calls = []

    def _note(self, method, arg=None):
        thread = threading.current_thread()
        self.calls.append((method, arg, thread.ident, thread.name))

    def start(self, header):
        self._note("start", header)

    def write(self, record):
        self._note("write", record)

    def flush(self):
        self._note("flush")

    def close(self):
        self._note("close")

    def methods(self):
        return [call[0] for call in self.calls]

    def written(self):
        return [arg for method, arg, *_ in self.calls if method == "write"]


class FailsOn(Recorder):
    """Raises in ``method`` at its ``nth`` call (1-based)."""

    def __init__(self, method, nth=1):
        super().__init__()
        self.method, self.nth, self.seen = method, nth, 0

    def _note(self, method, arg=None):
        super()._note(method, arg)
        if method == self.method:
            self.seen += 1
            if self.seen == self.nth:
                raise ValueError(f"boom in {method}")


def some_records():
    return [
        records.StepValues(0, {"loss": 1.0}),
        records.Metrics(0, {"val": 2.0}),
        records.Failed(1),
        records.StepValues(1, {"loss": 0.5}),
        records.Desync(1, (0,), (2,)),
    ]


def test_start_records_closed_flush_close_in_order():
    a, b = Recorder(), Recorder()
    pump = RecordPump([a, b], HEADER, flush_seconds=LONG)
    sent = some_records()
    for record in sent:
        pump.put(record)
    pump.close(steps=7)
    for exporter in (a, b):
        assert exporter.methods() == ["start"] + ["write"] * (len(sent) + 1) + ["flush", "close"]
        assert exporter.calls[0][1] is HEADER
        assert exporter.written()[:-1] == sent
        assert all(got is want for got, want in zip(exporter.written()[:-1], sent, strict=True))
        assert exporter.written()[-1] == records.Closed(7)
    assert pump.errors == []


def test_close_without_records_still_delivers_closed():
    rec = Recorder()
    RecordPump([rec], HEADER, flush_seconds=LONG).close(steps=0)
    assert rec.methods() == ["start", "write", "flush", "close"]
    assert rec.written() == [records.Closed(0)]


def test_many_records_arrive_in_order():
    rec = Recorder()
    pump = RecordPump([rec], HEADER, flush_seconds=LONG)
    sent = [records.StepValues(step, {"loss": float(step)}) for step in range(500)]
    for record in sent:
        pump.put(record)
    pump.close(steps=500)
    assert [r.step for r in rec.written()[:-1]] == list(range(500))


def test_exporters_are_flushed_periodically():
    rec = Recorder()
    pump = RecordPump([rec], HEADER, flush_seconds=0.05)
    pump.put(records.StepValues(0, {"loss": 1.0}))
    deadline = time.monotonic() + 3.0
    while rec.methods().count("flush") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    flushes_before_close = rec.methods().count("flush")
    assert "close" not in rec.methods()
    pump.close(steps=1)
    assert flushes_before_close >= 2  # with nothing queued, too
    assert rec.methods()[:2] == ["start", "write"]
    assert rec.methods()[-3:] == ["write", "flush", "close"]


def test_calls_happen_on_the_pump_thread():
    rec = Recorder()
    pump = RecordPump([rec], HEADER, flush_seconds=LONG)
    pump.put(records.Failed(0))
    pump.close(steps=1)
    idents = {ident for _, _, ident, _ in rec.calls}
    names = {name for *_, name in rec.calls}
    assert len(idents) == 1 and threading.get_ident() not in idents
    assert names == {"gradscope-pump"}
    assert not any(t.name == "gradscope-pump" and t.ident in idents for t in threading.enumerate())


def test_put_does_not_wait_for_a_slow_exporter():
    release = threading.Event()

    class Slow(Recorder):
        def write(self, record):
            release.wait(5.0)
            super().write(record)

    slow = Slow()
    pump = RecordPump([slow], HEADER, flush_seconds=LONG)
    began = time.monotonic()
    for step in range(20):
        pump.put(records.Failed(step))
    elapsed = time.monotonic() - began
    release.set()
    pump.close(steps=20)
    assert elapsed < 1.0
    assert [r.step for r in slow.written()[:-1]] == list(range(20))


def test_an_exporter_failing_in_write_is_dropped_and_the_others_get_everything():
    broken, good = FailsOn("write", nth=2), Recorder()
    sent = some_records()
    with pytest.warns(RuntimeWarning) as caught:
        pump = RecordPump([broken, good], HEADER, flush_seconds=LONG)
        for record in sent:
            pump.put(record)
        pump.close(steps=2)
    assert broken.methods() == ["start", "write", "write"]  # the second write raised: nothing after
    assert broken.written() == sent[:2]
    assert good.written() == [*sent, records.Closed(2)]
    assert good.methods()[-2:] == ["flush", "close"]
    assert pump.errors == ["FailsOn.write failed (ValueError: boom in write); it is dropped"]
    gradscope_warnings = [w for w in caught if "gradscope" in str(w.message)]
    assert len(gradscope_warnings) == 1
    assert str(gradscope_warnings[0].message) == f"gradscope: exporter {pump.errors[0]}"


@pytest.mark.parametrize("method", ["start", "flush", "close"])
def test_an_exporter_failing_elsewhere_is_dropped_too(method):
    broken, good = FailsOn(method), Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pump = RecordPump([broken, good], HEADER, flush_seconds=LONG)
        pump.put(records.Failed(0))
        pump.close(steps=1)
    assert broken.methods()[-1] == method
    assert broken.methods().count(method) == 1
    assert good.methods() == ["start", "write", "write", "flush", "close"]
    assert pump.errors == [f"FailsOn.{method} failed (ValueError: boom in {method}); it is dropped"]
    assert [w.category for w in caught if "gradscope" in str(w.message)] == [GradscopeWarning]


def test_every_exporter_failing_leaves_the_pump_working():
    a, b = FailsOn("write"), FailsOn("start")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pump = RecordPump([a, b], HEADER, flush_seconds=LONG)
        pump.put(records.Failed(0))
        pump.put(records.Failed(1))
        pump.close(steps=2)
    assert sorted(pump.errors) == [
        "FailsOn.start failed (ValueError: boom in start); it is dropped",
        "FailsOn.write failed (ValueError: boom in write); it is dropped",
    ]
    assert a.methods() == ["start", "write"] and b.methods() == ["start"]


SLEEP = MappingProxyType({"start": 0.2, "write": 0.01, "flush": 0.02, "close": 0.2})


class Timed(Recorder):
    """Each method sleeps a known time (``SLEEP``); remembers what the pump says each call took."""

    def __init__(self):
        super().__init__()
        self.measured = []

    def _note(self, method, arg=None):
        super()._note(method, arg)
        time.sleep(SLEEP[method])

    def spent(self, seconds):
        self.measured.append((self.methods()[-1], seconds))


def test_an_exporters_budget_counts_its_write_and_flush_calls_and_nothing_else():
    """``Exporter.spent`` gets one measurement per ``write`` and ``flush`` (what a scalar
    exporter's time budget counts), each at least the call's own time, and none for ``start``
    or ``close`` (once per run: not the per-step cost a budget is about)."""
    timed = Timed()
    pump = RecordPump([timed], HEADER, flush_seconds=LONG)
    for record in some_records()[:2]:
        pump.put(record)
    pump.close(2)
    assert [method for method, _ in timed.measured] == ["write", "write", "write", "flush"]  # 2 + Closed
    for method, seconds in timed.measured:
        assert SLEEP[method] <= seconds < SLEEP[method] + 1.0, (method, seconds)  # its own call, on a busy machine


def test_a_script_that_never_closes_its_monitor_still_exits_and_closes_its_log(tmp_path):
    """The pump's thread must not keep the interpreter alive (a daemon thread): a script that
    forgets ``mon.close()`` exits, and the monitor's finalizer, run at exit, still writes the
    log's closing record."""
    import subprocess
    import sys

    import gradscope

    script = f"""
import torch, gradscope
model = torch.nn.Linear(3, 2)
mon = gradscope.watch(model, log_dir={str(tmp_path / "log")!r}, backend="numpy")
for step in range(3):
    model(torch.ones(4, 3)).sum().backward()
    mon.step(loss=1.0)
print("trained")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr
    run = gradscope.load_run(tmp_path / "log")
    assert run.closed and list(run.history("norm").steps) == [0, 1, 2]
