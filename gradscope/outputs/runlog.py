"""``RunLog``: the exporter that writes a run's records as a run log (JSON Lines files).

``watch(model, log_dir="runs/x")`` appends one line per record (a sampled step's per-layer
statistics, each step's loss/metrics/resources) to ``runs/x/gradscope-00000.jsonl``,
starting with a header line (format version, run description, layer names, histogram
edges). Writing happens on the monitor's background thread (:mod:`gradscope.outputs.pump`)
and is flushed at least every two seconds and at ``close()``. When a file passes
``segment_bytes`` the log continues in the next file, which starts with its own header;
``max_bytes`` (off by default) deletes the oldest files beyond that total. The file layout
and the reader are in :mod:`gradscope.run.logfile`; :func:`gradscope.load_run` reads a log
back into the same history and report.
"""

from __future__ import annotations

import os

from gradscope.outputs.exporters.base import Exporter
from gradscope.run import records
from gradscope.run.logfile import PATTERN, SEGMENT_BYTES, check_log_dir, segment_path


class RunLog(Exporter):
    """Writes a run's records as JSON lines (see the module docstring).

    ``watch(model, log_dir=d)`` is ``watch(model, exporters=[RunLog(d)])``; construct it
    yourself to choose the file size or a cap on the total.

    Args:
        directory: where the log files go (created; must not hold a run log already).
        segment_bytes: size in bytes after which a new file is started.
        max_bytes: if given, the oldest files are deleted while the log is larger (the log
            then starts later than the run: :attr:`gradscope.Run.first_segment` > 0).

    Raises:
        FileExistsError: ``directory`` already holds a run log.
        NotADirectoryError: ``directory`` is a file.
        ValueError: a size is not a positive integer.
    """

    def __init__(self, directory: str | os.PathLike, segment_bytes: int = SEGMENT_BYTES, max_bytes: int | None = None):
        for name, value in (("segment_bytes", segment_bytes), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"RunLog: {name} must be a positive integer, got {value!r}")
        self.directory = check_log_dir(directory)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self._file = None
        self._index = 0
        self._written = 0

    def start(self, header: records.Header) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._header = header
        self._open(0)

    def _open(self, index: int) -> None:
        self._index = index
        self._file = open(segment_path(self.directory, index), "a", encoding="utf-8")
        header = records.Header(self._header.info, self._header.thresholds, segment=index)
        self._written = 0
        self._line(records.encode(header))
        self._file.flush()  # a reader finds at least the header as soon as the file exists

    def _line(self, text: str) -> None:
        self._file.write(text + "\n")
        self._written += len(text) + 1

    def write(self, record: records.Record) -> None:
        self._line(records.encode(record))
        if self._written >= self.segment_bytes:
            self._file.close()
            self._open(self._index + 1)
            self._trim()

    def _trim(self) -> None:
        if self.max_bytes is None:
            return
        files = sorted(self.directory.glob(PATTERN))
        total = sum(f.stat().st_size for f in files)
        for old in files[:-1]:
            if total <= self.max_bytes:
                break
            total -= old.stat().st_size
            old.unlink()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
