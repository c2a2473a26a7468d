"""``RecordPump``: a background thread that delivers a run's records to its exporters.

The training thread only puts records on a queue (a few microseconds); encoding, writing
files and calling exporters happen on the pump's thread. It flushes every exporter at least
every ``flush_seconds`` and when closed, and tells each exporter how long each of its
``write`` and ``flush`` calls took (``Exporter.spent``: what an exporter's time budget
counts). An exporter that raises is reported once and dropped; the others, and training, go on.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Sequence

from gradscope.outputs.exporters.base import Exporter
from gradscope.run import records
from gradscope.stats.reporting import GradscopeWarning

FLUSH_SECONDS = 2.0
QUEUE_LIMIT = 4096  # records waiting; putting more waits for the pump (it is far faster than training)


class RecordPump:
    """Delivers records to ``exporters`` from a daemon thread.

    Args:
        exporters: the destinations.
        header: the run's header, delivered first (``start``).
        flush_seconds: longest time between flushes.
    """

    def __init__(
        self, exporters: Sequence[Exporter], header: records.Header, flush_seconds: float = FLUSH_SECONDS
    ) -> None:
        self._exporters = list(exporters)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_LIMIT)
        self._flush_seconds = flush_seconds
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(header,), name="gradscope-pump", daemon=True)
        self._thread.start()

    def put(self, record: records.Record) -> None:
        self._queue.put(record)

    def close(self, steps: int) -> None:
        """Deliver what is queued and a ``Closed`` record, flush, close every exporter."""
        self._queue.put(records.Closed(steps))
        self._queue.put(None)
        self._thread.join()

    def _call(self, exporter: Exporter, method: str, *args) -> None:
        started = time.perf_counter()
        try:
            getattr(exporter, method)(*args)
            if method in ("write", "flush"):  # what an exporter's budget counts (Exporter.spent)
                exporter.spent(time.perf_counter() - started)
        except Exception as error:  # one broken exporter must not stop the others or training
            self._exporters.remove(exporter)
            message = f"{type(exporter).__name__}.{method} failed ({type(error).__name__}: {error}); it is dropped"
            self.errors.append(message)
            warnings.warn(f"gradscope: exporter {message}", GradscopeWarning, stacklevel=2)

    def _each(self, method: str, *args) -> None:
        for exporter in list(self._exporters):
            self._call(exporter, method, *args)

    def _run(self, header: records.Header) -> None:
        self._each("start", header)
        last_flush = time.monotonic()
        while True:
            try:
                record = self._queue.get(timeout=self._flush_seconds)
            except queue.Empty:
                record = ...
            if record is None:
                break
            if record is not ...:
                self._each("write", record)
            if time.monotonic() - last_flush >= self._flush_seconds:
                self._each("flush")
                last_flush = time.monotonic()
        self._each("flush")
        self._each("close")
