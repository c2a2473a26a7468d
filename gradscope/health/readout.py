"""Reading a run: its history, statistics and health report, live or from its log.

:class:`RunReadout` is the one read interface a live :class:`gradscope.Monitor` and a run
read back from its log (:class:`Run`, from :func:`load_run`) share: ``history``, ``fields``,
``stats`` and ``report`` over a :class:`~gradscope.run.state.RunState`. A subclass only says
how to reach an up-to-date state (the monitor first collects what has reached the host).
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from gradscope.health.report import HealthReport, assess
from gradscope.health.thresholds import Thresholds
from gradscope.run.history import Series
from gradscope.run.info import RunInfo
from gradscope.run.logfile import RunLogError, read_log
from gradscope.run.stages import read_stages, stage_logs
from gradscope.run.state import RunState
from gradscope.stats.tensor_stats import TensorStats


class RunReadout(abc.ABC):
    """History, statistics and health of a run (see the module docstring).

    Attributes:
        info: the run's description (:class:`gradscope.run.info.RunInfo`).
        rows: names of the reported rows (layers, or parameters).
        row_types: class names of the modules owning them (``"Linear"``).
        summary: parameters, trainable parameters, bytes and layers of the model.
        tags: the run's tags (``watch(tags=...)``).
        thresholds: the :class:`gradscope.Thresholds` reports use by default.
    """

    info: RunInfo
    thresholds: Thresholds

    @property
    def rows(self) -> tuple[str, ...]:
        return self.info.rows

    @property
    def row_types(self) -> tuple[str, ...]:
        return self.info.row_types

    @property
    def summary(self) -> dict:
        return self.info.summary

    @property
    def tags(self) -> dict:
        """The run's tags (``watch(tags=...)``; empty when none, or in logs older than schema 7)."""
        return self.info.tags

    @abc.abstractmethod
    def _reading(self, wait: bool) -> AbstractContextManager[RunState]:
        """The run's state, up to date; with ``wait``, after everything in flight has arrived
        (a context manager: a live monitor holds its lock while the state is read)."""

    def history(self, field: str) -> Series:
        """Values of ``field`` over the kept steps, oldest first (waits for pending steps).

        Per-row fields (``(steps, rows)``; NaN where a row had no gradient): ``numel``,
        ``sum``, ``sumsq``, ``max_abs``, ``zeros``, ``nans``, ``infs``, ``norm``, ``rms``,
        ``mean``, ``zero_frac``, ``nonfinite``, ``finite``, ``present``,
        ``backward_order`` (0 = the row whose gradient was final first), ``hist``
        (``(steps, rows, 64)``), and with ``track_updates`` ``weight_norm``,
        ``update_norm``, ``update_ratio``. Per-step fields (``(steps,)``, every step):
        ``loss``, ``step_time`` (s), ``peak_memory`` (bytes), ``energy`` (J),
        ``grad_scale``, ``skipped``, ``failed``, every logged metric and, under DDP with
        gradscope's communication hook, ``noise_scale`` (``B_simple``), ``grad_sq_small``
        (each rank's own ``|g_i|^2``, mean over ranks) and ``grad_sq_big`` (``|g|^2`` averaged).
        """
        with self._reading(wait=True) as state:
            return state.series(field)

    def fields(self) -> tuple[str, ...]:
        """Names :meth:`history` accepts."""
        with self._reading(wait=True) as state:
            return state.fields()

    def stats(self, step: int | None = None) -> TensorStats:
        """Statistics of the rows present at a sampled ``step`` (default: the latest)."""
        with self._reading(wait=True) as state:
            return state.stats(step)

    def latest(self, wait: bool = False) -> tuple[int, np.ndarray, np.ndarray] | None:
        """The newest sampled step whose statistics have reached the host, as
        ``(step, rows, present)``: float64 ``(R, ROW_WIDTH)`` statistics rows
        (:mod:`gradscope.stats.layout`) and bool ``(R,)``; None before the first.

        Unlike :meth:`stats` it does not wait for steps in flight (unless ``wait``): cheap and
        free of host synchronisation, for a trainer's logging hook at every logging step.
        """
        with self._reading(wait=wait) as state:
            step = state.history.latest_sampled()
            found = state.history.sampled_rows(step) if step >= 0 else None
            return None if found is None else (step, *found)

    def report(self, thresholds: Thresholds | None = None, wait: bool = False) -> HealthReport:
        """The run's health: status, findings, per-layer rows and resources.

        Cheap enough to call every step: it reads what has reached the host (on GPU, steps
        whose results are still in flight are judged by the next call) over a bounded
        window of sampled steps, and its note names the steps still in flight. ``wait=True``
        first waits for every step in flight (a run read back from its log has nothing in
        flight). ``thresholds`` overrides the run's :class:`gradscope.Thresholds`.
        """
        with self._reading(wait=wait) as state:
            in_flight = () if wait else self._in_flight()
            return assess(state, thresholds or self.thresholds, in_flight)

    def _in_flight(self) -> tuple[int, ...]:
        """Sampled steps whose statistics have not reached the host yet (read while the state
        is held); a run read back from its log has none."""
        return ()


class Run(RunReadout):
    """A run read back from its log (:func:`load_run`): the same accessors as a live monitor.

    Attributes:
        info, rows, summary: as for :class:`RunReadout`.
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
        self.thresholds = thresholds
        self.closed = closed
        self.files = files
        self.first_segment = first_segment

    @contextlib.contextmanager
    def _reading(self, wait: bool) -> Iterator[RunState]:
        yield self._state

    def __repr__(self) -> str:
        return (
            f"<gradscope.Run {len(self.rows)} rows, {len(self.files)} file(s){'' if self.closed else ', not closed'}>"
        )


def load_run(path: str | os.PathLike, history_mib: int | None = None) -> Run:
    """Read a run log: a log directory (``watch(log_dir=...)``), or one of its files.

    ``load_run(path).report()`` equals the live monitor's report at ``close()``. The log is
    read line by line into a history of the run's memory budget (``history_mib``: MiB, None
    for the ``watch(history_mib=)`` the run was recorded with), so reading takes that much
    memory and about one line more, however long the log. The ``log_dir`` of a
    pipeline-parallel run (one log per stage) is read as one run of the whole model
    (:mod:`gradscope.run.stages`).

    Raises:
        FileNotFoundError: nothing at ``path``.
        RunLogError: not a gradscope run log, a corrupt line (with its file and line
            number), or a log written by a newer gradscope.
        ValueError: ``history_mib`` is not None or a positive integer.
    """
    if history_mib is not None and (
        isinstance(history_mib, bool) or not isinstance(history_mib, int) or history_mib < 1
    ):
        raise ValueError(f"load_run: history_mib must be None or a positive integer, got {history_mib!r}")
    stages = stage_logs(path)
    logged = read_log(path, history_mib) if stages is None else read_stages(stages, history_mib)
    try:
        thresholds = Thresholds(**logged.thresholds)
    except (TypeError, ValueError) as error:
        raise RunLogError(f"{logged.files[0]}:1: the header does not describe a run ({error})") from None
    return Run(logged.state, thresholds, logged.closed, logged.files, first_segment=logged.first_segment)
