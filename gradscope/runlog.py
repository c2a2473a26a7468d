"""The run log: a run's records in JSON Lines files, and :func:`load_run` to read them back.

``watch(model, log_dir="runs/x")`` appends one line per record (a sampled step's per-layer
statistics, each step's loss/metrics/resources) to ``runs/x/gradscope-00000.jsonl``,
starting with a header line (format version, run description, layer names, histogram
edges). Writing happens on the monitor's background thread and is flushed at least every two
seconds and at ``close()``; a process that crashes or is killed leaves a readable file whose
last line may be cut short, and readers skip such a line with a warning. When a file passes
``segment_bytes`` the log continues in the next file, which starts with its own header;
``max_bytes`` (off by default) deletes the oldest files beyond that total.

``load_run(path).report()`` equals the live monitor's report at close: replaying the
records into a :class:`~gradscope.run.RunState` rebuilds the same history and events.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from gradscope import layout, records
from gradscope.exporters import Exporter
from gradscope.history import Series
from gradscope.report import HealthReport
from gradscope.run import RunInfo, RunState
from gradscope.tensor_stats import TensorStats
from gradscope.thresholds import Thresholds

SEGMENT_BYTES = 64 << 20
"""Bytes after which the log continues in a new file."""

_PATTERN = "gradscope-*.jsonl"


class RunLogError(ValueError):
    """A run log that cannot be read: corrupt, foreign, or from a newer gradscope."""


def segment_path(directory: Path, index: int) -> Path:
    return directory / f"gradscope-{index:05d}.jsonl"


def check_log_dir(directory: str | os.PathLike) -> Path:
    """The log directory, created if needed; raises if it already holds a run log."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"log_dir {str(path)!r} is a file, not a directory")
    if path.is_dir() and any(path.glob(_PATTERN)):
        raise FileExistsError(f"log_dir {str(path)!r} already holds a gradscope run log; use a new directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunLog(Exporter):
    """Writes a run's records as JSON lines (see the module docstring).

    ``watch(model, log_dir=d)`` is ``watch(model, exporters=[RunLog(d)])``; construct it
    yourself to choose the file size or a cap on the total.

    Args:
        directory: where the log files go (created; must not hold a run log already).
        segment_bytes: size in bytes after which a new file is started.
        max_bytes: if given, the oldest files are deleted while the log is larger (the log
            then starts later than the run: :attr:`Run.first_segment` > 0).

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
        files = sorted(self.directory.glob(_PATTERN))
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


class Run:
    """A run read back from its log: the same accessors as a live monitor.

    Attributes:
        info: the run's description (:class:`gradscope.run.RunInfo`).
        rows: names of the rows (layers).
        summary: the model's parameters, trainable parameters, bytes and layers.
        thresholds: the thresholds the run was monitored with.
        closed: whether the log ends with the monitor's ``close()`` (False after a crash).
        files: the log files read.
        first_segment: index of the first file read; above 0 when ``max_bytes`` deleted the
            oldest files, so the history (and what the report knows) starts later than the run.
    """

    def __init__(
        self, state: RunState, thresholds: Thresholds, closed: bool, files: list[Path], first_segment: int = 0
    ) -> None:
        self._state = state
        self.info = state.info
        self.rows = state.info.rows
        self.summary = state.info.summary
        self.thresholds = thresholds
        self.closed = closed
        self.files = files
        self.first_segment = first_segment

    def history(self, field: str) -> Series:
        """As :meth:`gradscope.Monitor.history`."""
        return self._state.series(field)

    def fields(self) -> tuple[str, ...]:
        return self._state.fields()

    def stats(self, step: int | None = None) -> TensorStats:
        return self._state.stats(step)

    def report(self, thresholds: Thresholds | None = None) -> HealthReport:
        """As :meth:`gradscope.Monitor.report`, by default with the run's own thresholds."""
        return self._state.report(thresholds or self.thresholds)

    def __repr__(self) -> str:
        return (
            f"<gradscope.Run {len(self.rows)} rows, {len(self.files)} file(s){'' if self.closed else ', not closed'}>"
        )


def _check_shapes(record: records.Record, n_rows: int) -> None:
    if isinstance(record, records.Sampled):
        shapes = (record.rows.shape, record.present.shape, record.order.shape)
        if shapes != ((n_rows, layout.ROW_WIDTH), (n_rows,), (n_rows,)):
            raise ValueError(f"a sampled step with shapes {shapes} in a run of {n_rows} rows")
    elif isinstance(record, records.Updates) and (record.weight_sq.shape, record.update_sq.shape) != ((n_rows,),) * 2:
        raise ValueError(f"update norms of shape {record.weight_sq.shape} in a run of {n_rows} rows")


def load_run(path: str | os.PathLike) -> Run:
    """Read a run log: a log directory, or one of its files.

    Raises:
        FileNotFoundError: nothing at ``path``.
        RunLogError: not a gradscope run log, a corrupt line (with its file and line
            number), or a log written by a newer gradscope.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run log at {str(path)!r}")
    files = sorted(path.glob(_PATTERN)) if path.is_dir() else [path]
    if not files:
        raise RunLogError(f"{path}: no gradscope run log here (no {_PATTERN} files)")
    state: RunState | None = None
    thresholds = Thresholds()
    closed = False
    segments: list[int] = []
    for number, file in enumerate(files):
        last_file = number == len(files) - 1
        try:
            with open(file, encoding="utf-8") as handle:
                lines = handle.readlines()
        except UnicodeDecodeError as error:
            raise RunLogError(f"{file}: not a gradscope run log (not UTF-8 text: {error})") from None
        for lineno, line in enumerate(lines, 1):
            where = f"{file}:{lineno}"
            try:
                if not line.endswith("\n"):
                    raise ValueError("the line is cut short")
                record = records.decode(line)
            except (ValueError, KeyError, TypeError) as error:
                if last_file and lineno == len(lines) and lineno > 1:
                    warnings.warn(
                        f"gradscope: skipping the torn last line of {where} ({error})", RuntimeWarning, stacklevel=2
                    )
                    break
                if lineno == 1:
                    raise RunLogError(f"{where}: not a gradscope run log ({error})") from None
                raise RunLogError(f"{where}: corrupt record ({error})") from None
            if lineno == 1:
                if not isinstance(record, records.Header):
                    raise RunLogError(f"{where}: not a gradscope run log (the first line is not a gradscope header)")
                if record.schema > records.SCHEMA:
                    raise RunLogError(
                        f"{where}: written by a newer gradscope (log schema {record.schema}); this gradscope reads "
                        f"schema {records.SCHEMA} and older: upgrade gradscope to read it"
                    )
                if segments and record.segment != segments[-1] + 1:
                    warnings.warn(
                        f"gradscope: {file.name} is segment {record.segment} but segment {segments[-1] + 1} is "
                        f"missing: the records in between are lost",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                segments.append(record.segment)
                if state is None:
                    try:
                        state = RunState(RunInfo.from_dict(record.info))
                        thresholds = Thresholds(**record.thresholds)
                    except (TypeError, ValueError, KeyError) as error:
                        raise RunLogError(f"{where}: the header does not describe a run ({error})") from None
                continue
            if isinstance(record, records.Header):
                raise RunLogError(f"{where}: a header in the middle of a file")
            if isinstance(record, records.Closed):
                closed = True
            try:
                _check_shapes(record, len(state.info.rows))
                state.apply(record)
            except (ValueError, IndexError, KeyError, TypeError) as error:
                raise RunLogError(f"{where}: corrupt record ({error})") from None
    if state is None:
        raise RunLogError(f"{files[0]}: empty (a run that has not written its first records yet?)")
    return Run(state, thresholds, closed, files, first_segment=segments[0])
