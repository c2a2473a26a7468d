"""A run log's records, one at a time, read by a thread of its own: several logs side by side.

:func:`gradscope.run.logfile.read_log` replays a log into a state. Joining the logs of a
pipeline's stages into one run (:mod:`gradscope.run.stages`) needs their records together,
step by step, without holding any log whole: a :class:`RecordStream` runs ``read_log`` in a
thread, with a stand-in state that hands each record over through a small bounded queue. So
memory stays at a few records per log however long the run, and every check ``read_log``
makes (header, schema, segments, a torn last line) applies unchanged; its errors and warnings
reach the reader.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from gradscope.run import records
from gradscope.run.info import RunInfo
from gradscope.run.logfile import LoggedRun, read_log

QUEUE_RECORDS = 64
"""Records a stream's thread may read ahead of its reader."""


class _Stopped(Exception):
    """The stream was closed: its thread stops reading."""


class _Relay:
    """Stands in for the run state in ``read_log``: hands the header's run description and
    then each record to ``put``."""

    def __init__(self, info: RunInfo, put) -> None:
        self.info = info
        self._put = put
        put(("info", info))

    def apply(self, record: records.Record) -> None:
        self._put(("record", record))


class RecordStream:
    """The records of one run log (see the module docstring); close it (or use ``with``).

    Args:
        path: a log directory, or one of its files.

    Attributes:
        path: as given.
        info: the run's description, from the log's first header (read at construction).
        logged: once :meth:`records` is exhausted, what ``read_log`` returned: thresholds,
            whether the log was closed, its files (its ``state`` is the stand-in).

    Raises:
        FileNotFoundError, RunLogError: as :func:`~gradscope.run.logfile.read_log`, at
            construction (no header) or from :meth:`records` (a later line).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.logged: LoggedRun | None = None
        self._queue: queue.Queue = queue.Queue(QUEUE_RECORDS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"gradscope-read-{self.path.name}", daemon=True)
        self._thread.start()
        kind, value = self._queue.get()
        if kind == "error":
            self.close()
            raise value
        self.info: RunInfo = value

    def _put(self, item: tuple) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _read(self) -> None:
        try:
            self._put(("end", read_log(self.path, state_for=lambda info: _Relay(info, self._put))))
        except _Stopped:
            return
        except BaseException as error:  # handed to the reader, who raises it
            try:
                self._put(("error", error))
            except _Stopped:
                return

    def records(self) -> Iterator[records.Record]:
        """The log's records after its header, in the order written (once)."""
        while self.logged is None:
            kind, value = self._queue.get()
            if kind == "record":
                yield value
            elif kind == "end":
                self.logged = value
            else:
                raise value

    def close(self) -> None:
        """Stop the thread (at once, also mid-log) and wait for it. Idempotent."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> RecordStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
