"""Run-log files: where a run log lives, and reading one back into a :class:`RunState`.

A run log (written by :class:`gradscope.outputs.runlog.RunLog`, ``watch(log_dir=...)``) is a
directory of JSON Lines files ``gradscope-00000.jsonl``, ``gradscope-00001.jsonl``, ...; each
starts with a header line (format version, run description, thresholds, histogram edges),
then one line per record (:mod:`gradscope.run.records`). A process that crashes or is killed
leaves a readable file whose last line may be cut short: :func:`read_log` skips such a line
with a warning. Replaying the records into a new :class:`RunState` rebuilds the history and
events the live monitor had, so the report of a read-back run equals the live one
(:func:`gradscope.load_run`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gradscope.run import records
from gradscope.run.info import RunInfo
from gradscope.run.state import RunState
from gradscope.stats import layout
from gradscope.stats.reporting import GradscopeWarning

SEGMENT_BYTES = 64 << 20
"""Bytes after which the log continues in a new file."""

PATTERN = "gradscope-*.jsonl"
"""The names of a run log's files."""


class RunLogError(ValueError):
    """A run log that cannot be read: corrupt, foreign, or from a newer gradscope."""


def segment_path(directory: Path, index: int) -> Path:
    """The file of segment ``index`` in a log directory."""
    return directory / f"gradscope-{index:05d}.jsonl"


def check_log_dir(directory: str | os.PathLike) -> Path:
    """The log directory, checked (not made: the run log makes it when it starts); raises if it
    is a file or already holds a run log."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"log_dir {str(path)!r} is a file, not a directory")
    if path.is_dir() and any(path.glob(PATTERN)):
        raise FileExistsError(f"log_dir {str(path)!r} already holds a gradscope run log; use a new directory")
    return path


@dataclass
class LoggedRun:
    """What a run log holds.

    Attributes:
        state: the run's state, rebuilt from its records.
        thresholds: the health thresholds the run was monitored with (the ``Thresholds``
            fields, as a dict).
        closed: whether the log ends with the monitor's ``close()`` (False after a crash).
        files: the log files read.
        first_segment: index of the first file read; above 0 when ``max_bytes`` deleted the
            oldest files, so the history starts later than the run.
    """

    state: RunState
    thresholds: dict
    closed: bool
    files: list[Path]
    first_segment: int = 0


def _check_shapes(record: records.Record, n_rows: int) -> None:
    if isinstance(record, records.Sampled):
        shapes = (record.rows.shape, record.present.shape, record.order.shape)
        if shapes != ((n_rows, layout.ROW_WIDTH), (n_rows,), (n_rows,)):
            raise ValueError(f"a sampled step with shapes {shapes} in a run of {n_rows} rows")
    elif isinstance(record, records.Updates) and (record.weight_sq.shape, record.update_sq.shape) != ((n_rows,),) * 2:
        raise ValueError(f"update norms of shape {record.weight_sq.shape} in a run of {n_rows} rows")
    elif isinstance(record, records.Weights):
        n = len(record.row_of)
        shapes = (record.rows.shape, record.ndim.shape, record.grad_dot_weight.shape, record.grad_weight_sq.shape)
        if (
            shapes != ((n, layout.ROW_WIDTH), (n,), (n,), (n,))
            or ((record.row_of < 0) | (record.row_of >= n_rows)).any()
        ):
            raise ValueError(f"a weight reading with shapes {shapes} or rows outside a run of {n_rows} rows")


def read_log(
    path: str | os.PathLike, history_mib: int | None = None, state_for: Callable[[RunInfo], RunState] = RunState
) -> LoggedRun:
    """Read a run log: a log directory, or one of its files.

    The files are read line by line, each record applied as it is decoded, into a history
    sized by the run's memory budget (``history_mib``, default: the one the run was recorded
    with; :mod:`gradscope.run.budget`): reading a log takes that budget plus about one line,
    however long the log. Warns when the budget keeps less than the run asked for.

    ``state_for`` makes what the records are applied to from the header's run description
    (a stand-in with ``info`` and ``apply(record)`` passes them on: :mod:`gradscope.run.record_streams`).

    Raises:
        FileNotFoundError: nothing at ``path``.
        RunLogError: not a gradscope run log, a corrupt line (with its file and line
            number), or a log written by a newer gradscope.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run log at {str(path)!r}")
    files = sorted(path.glob(PATTERN)) if path.is_dir() else [path]
    if not files:
        raise RunLogError(f"{path}: no gradscope run log here (no {PATTERN} files)")
    replay = _Replay(history_mib, state_for)
    for number, file in enumerate(files):
        try:
            with open(file, encoding="utf-8") as handle:
                replay.read(handle, file, last_file=number == len(files) - 1)
        except UnicodeDecodeError as error:
            raise RunLogError(f"{file}: not a gradscope run log (not UTF-8 text: {error})") from None
    if replay.state is None:
        raise RunLogError(f"{files[0]}: empty (a run that has not written its first records yet?)")
    return LoggedRun(replay.state, replay.thresholds, replay.closed, files, first_segment=replay.segments[0])


class _Replay:
    """The records of a log's files applied, one line at a time, to the state its first header
    describes."""

    def __init__(self, history_mib: int | None, state_for: Callable[[RunInfo], RunState]) -> None:
        self.history_mib = history_mib
        self.state_for = state_for
        self.state: RunState | None = None
        self.thresholds: dict = {}
        self.closed = False
        self.segments: list[int] = []

    def read(self, handle, file: Path, last_file: bool) -> None:
        """Apply the lines of one open file (``last_file``: the log's newest)."""
        lineno = 0
        while line := handle.readline():
            lineno += 1
            where = f"{file}:{lineno}"
            try:
                if not line.endswith("\n"):
                    raise ValueError("the line is cut short")
                record = records.decode(line)
            except (ValueError, KeyError, TypeError) as error:
                # A killed writer leaves its last line torn: the newest file's last line, or the
                # header of a segment it had just begun (the earlier segments hold the run).
                # Only a line without "\n" or followed by nothing is a file's last.
                last_line = not line.endswith("\n") or not handle.readline()
                if last_file and last_line and (lineno > 1 or self.state is not None):
                    warnings.warn(
                        f"gradscope: skipping the torn last line of {where} ({error})", GradscopeWarning, stacklevel=3
                    )
                    return
                if lineno == 1:
                    raise RunLogError(f"{where}: not a gradscope run log ({error})") from None
                raise RunLogError(f"{where}: corrupt record ({error})") from None
            del line  # the decoded record is all that is needed now
            if lineno == 1:
                self._header(record, file, where)
            else:
                self._apply(record, where)

    def _header(self, record: records.Record, file: Path, where: str) -> None:
        if not isinstance(record, records.Header):
            raise RunLogError(f"{where}: not a gradscope run log (the first line is not a gradscope header)")
        if record.schema > records.SCHEMA:
            raise RunLogError(
                f"{where}: written by a newer gradscope (log schema {record.schema}); this gradscope reads "
                f"schema {records.SCHEMA} and older: upgrade gradscope to read it"
            )
        if self.segments and record.segment != self.segments[-1] + 1:
            warnings.warn(
                f"gradscope: {file.name} is segment {record.segment} but segment {self.segments[-1] + 1} is "
                f"missing: the records in between are lost",
                GradscopeWarning,
                stacklevel=4,
            )
        self.segments.append(record.segment)
        if self.state is not None:
            return
        try:
            info = RunInfo.from_dict(record.info)
            if self.history_mib is not None:
                info = dataclasses.replace(info, history_mib=self.history_mib)
            self.state = self.state_for(info)
            self.thresholds = dict(record.thresholds)
        except (TypeError, ValueError, KeyError) as error:
            raise RunLogError(f"{where}: the header does not describe a run ({error})") from None
        plan = getattr(self.state, "plan", None)  # a stand-in (record_streams) keeps no history
        if plan is not None and plan.warns:
            warnings.warn(plan.warning("load_run"), GradscopeWarning, stacklevel=4)

    def _apply(self, record: records.Record, where: str) -> None:
        if isinstance(record, records.Header):
            raise RunLogError(f"{where}: a header in the middle of a file")
        self.closed = isinstance(record, records.Closed)  # the log ends with close() only if nothing follows
        try:
            _check_shapes(record, len(self.state.info.rows))
            self.state.apply(record)
        except (ValueError, IndexError, KeyError, TypeError) as error:
            raise RunLogError(f"{where}: corrupt record ({error})") from None
