"""A pipeline-parallel run's logs, one per stage, read back as one run of the whole model.

Each stage of a pipeline (:mod:`gradscope.distributed.pipeline`) measures only its own layers,
and one rank per stage writes them into a folder of the run's ``log_dir`` (``stage-NNNNN``,
or ``rank-NNNNN`` when every rank logs); each log's header says which stage it holds
(``RunInfo.extra["pipeline"]``). :func:`stage_logs` finds one log per stage in such a
directory, and :func:`read_stages` joins them, step by step, into one
:class:`~gradscope.run.state.RunState` whose rows are every stage's, in stage order: its
report, its total norm (the square root of the stages' summed squares) and its history are
the whole model's. The logs are read side by side (:mod:`gradscope.run.record_streams`), a few
records each at a time.

How records combine across stages is declared here, once:

* a sampled step's rows (and update norms) are the stages' rows side by side; a sampled step
  that a stage's log lacks (its log ends earlier) or that failed in any stage is a failed step
  of the whole model, never a whole-model step with a stage missing;
* per-step values: :data:`STEP_VALUE_COMBINE`; the others (the loss, which only the last stage
  has, and metrics) are taken from the last stage that gives them;
* rows named in records (DDP replicas that disagree) move by the stage's first row;
* metrics, actions and failures are the run's, whichever stage logged them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path

import numpy as np

from gradscope.run import records
from gradscope.run.info import RunInfo
from gradscope.run.logfile import PATTERN, LoggedRun, RunLogError
from gradscope.run.record_streams import RecordStream
from gradscope.run.state import RunState
from gradscope.stats.reporting import GradscopeWarning

STEP_VALUE_COMBINE = {"step_time": max, "peak_memory": max, "energy": sum}
"""Per-step values every stage measures on its own device, and how they combine: the step
takes as long as its slowest stage and as much memory as its fullest device, and uses the
energy of all of them."""

SAME_IN_EVERY_STAGE = ("every", "mode", "granularity", "track_updates", "histogram_every")
"""``RunInfo`` fields the stages' logs must agree on to be read as one run."""


def _pipeline_of(log: Path) -> tuple[dict, int] | None:
    """The header's ``extra["pipeline"]`` of the log in folder ``log`` and the global rank that
    wrote it; None for a log of no pipeline stage."""
    first = sorted(log.glob(PATTERN))[0]
    try:
        with open(first, encoding="utf-8") as handle:
            header = records.decode(handle.readline())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise RunLogError(f"{first}:1: not a gradscope run log ({error})") from None
    extra = header.info.get("extra", {}) if isinstance(header, records.Header) else {}
    if "pipeline" not in extra:
        return None
    return extra["pipeline"], int(extra.get("distributed", {}).get("global_rank", 0))


def stage_logs(path: str | os.PathLike) -> list[Path] | None:
    """The log of each stage, in stage order, of the pipeline run logged in directory ``path``;
    None when ``path`` is not such a directory (a log itself, a file, or folders of other logs).

    Where several pipelines logged (``log_rank=None`` with data parallelism), the logs of the
    complete pipeline with the lowest rank are read (the others hold the same gradients; the
    loss is that pipeline's), or, if none is complete, any log of each stage.

    Raises:
        RunLogError: a stage has no log in ``path`` (the message names it).
    """
    path = Path(path)
    if not path.is_dir() or any(path.glob(PATTERN)):
        return None
    found = {}
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and any(p.glob(PATTERN))):
        described = _pipeline_of(folder)
        if described is not None:
            found[folder] = described
    if not found:
        return None
    pipelines: dict[tuple[int, ...], dict[int, Path]] = {}
    for folder, (pipeline, _) in sorted(found.items(), key=lambda item: item[1][1]):  # by the rank that logged
        pipelines.setdefault(tuple(pipeline["ranks"]), {}).setdefault(int(pipeline["stage"]), folder)
    stages = max(int(pipeline["stages"]) for pipeline, _ in found.values())
    complete = [logs for ranks, logs in sorted(pipelines.items(), key=lambda item: min(item[0])) if len(logs) == stages]
    if complete:
        return [complete[0][stage] for stage in range(stages)]
    # No pipeline logged whole: any replica of each stage holds the same gradients.
    any_replica: dict[int, Path] = {}
    for logs in sorted(pipelines.items(), key=lambda item: min(item[0])):
        for stage, folder in logs[1].items():
            any_replica.setdefault(stage, folder)
    missing = [stage for stage in range(stages) if stage not in any_replica]
    if missing:
        raise RunLogError(
            f"{path}: the logs of a pipeline of {stages} stages, but stage {missing[0]} has no log here (found "
            f"stages {sorted(any_replica)}); read one stage's log alone with load_run({str(path / 'stage-00000')!r})"
        )
    return [any_replica[stage] for stage in range(stages)]


def merged_info(infos: list[RunInfo]) -> RunInfo:
    """The description of the whole model's run from its stages' (in stage order): their rows
    side by side, their parameters summed, ``extra["pipeline"]`` with each stage's row count.

    Raises:
        RunLogError: the stages disagree on how they were monitored, or two stages have rows
            of the same name.
    """
    first = infos[0]
    for name in SAME_IN_EVERY_STAGE:
        values = [getattr(info, name) for info in infos]
        if any(value != values[0] for value in values):
            raise RunLogError(f"the pipeline stages' logs disagree on {name}: {values}")
    rows = tuple(row for info in infos for row in info.rows)
    seen: set[str] = set()
    twice = [row for row in rows if row in seen or seen.add(row)]
    if twice:
        raise RunLogError(f"two pipeline stages' logs have rows named {twice[:5]}: they cannot be read as one run")
    dtypes = tuple(d for info in infos for d in info.row_dtypes)
    extra = dict(first.extra)
    extra["pipeline"] = {
        "stages": len(infos),
        "ranks": list(first.extra["pipeline"]["ranks"]),
        "stage_rows": [len(info.rows) for info in infos],
    }
    return dataclasses.replace(
        first,
        rows=rows,
        row_types=tuple(t for info in infos for t in info.row_types),
        row_numel=tuple(n for info in infos for n in info.row_numel),
        row_dtypes=dtypes if len(dtypes) == len(rows) else (),
        summary={key: sum(info.summary.get(key, 0) for info in infos) for key in first.summary},
        history=min(info.history for info in infos),
        hist_history=min(info.hist_history for info in infos),
        extra=extra,
        modules=(),
        module_types=(),
    )


def _sampled(step: int, parts: list[records.Sampled]) -> records.Sampled:
    """One sampled step of the whole model from each stage's (in stage order). Backward runs
    from the last stage to the first, so a stage's backward order (where known) follows the
    measured rows of every later stage."""
    orders, later = [], 0
    for part in reversed(parts):
        orders.append(np.where(part.order >= 0, part.order + later, -1))
        later += int((part.order >= 0).sum())
    ranked = [p for p in parts if p.nonfinite_rank is not None]
    rank = ranks = None
    if ranked:
        rank = np.concatenate(
            [p.nonfinite_rank if p.nonfinite_rank is not None else np.full(len(p.present), -1) for p in parts]
        )
        ranks = np.concatenate(
            [p.nonfinite_ranks if p.nonfinite_ranks is not None else np.zeros(len(p.present), np.int64) for p in parts]
        )
    return records.Sampled(
        step,
        np.concatenate([p.rows for p in parts]),
        np.concatenate([p.present for p in parts]),
        np.concatenate(orders[::-1]),
        rank,
        ranks,
    )


def _step_values(step: int, parts: list[dict]) -> records.StepValues:
    """One step's values from the stages' (in stage order; see :data:`STEP_VALUE_COMBINE`)."""
    values: dict = {}
    for part in parts:
        values.update(part)
    for name, combine in STEP_VALUE_COMBINE.items():
        given = [part[name] for part in parts if name in part]
        if given:
            values[name] = float(combine(given))
    return records.StepValues(step, values)


class _Join:
    """The records of ``n`` stages joined into ``state`` as they arrive (module docstring)."""

    def __init__(self, state: RunState, offsets: list[int]) -> None:
        self.state = state
        self.offsets = offsets
        n = len(offsets)
        # per kind of step-wise record: step -> {stage: record}, and the last step each stage gave
        self.pending: dict[type, dict[int, dict[int, object]]] = {
            kind: {} for kind in (records.Sampled, records.Updates, records.StepValues)
        }
        self.last = {kind: [-1] * n for kind in self.pending}
        self.failed: set[int] = set()
        self.unmatched: list[int] = []

    def take(self, stage: int, record: records.Record) -> None:
        kind = type(record)
        if kind in self.pending:
            self.pending[kind].setdefault(record.step, {})[stage] = record
            self.last[kind][stage] = record.step
        elif isinstance(record, records.Desync):
            moved = tuple(row + self.offsets[stage] for row in record.rows)
            self.state.apply(dataclasses.replace(record, rows=moved))
        elif isinstance(record, records.Failed):
            self.failed.add(record.step)
            self.state.apply(record)
        elif not isinstance(record, records.Forward):  # metrics, actions (a stage has no forward statistics)
            self.state.apply(record)

    def settle(self, done: list[bool], final: bool = False) -> None:
        """Apply every pending step that each stage has given or gone past."""
        n = len(done)
        for kind, pending in self.pending.items():
            last = self.last[kind]
            for step in sorted(pending):
                parts = pending[step]
                if not final and any(s not in parts and not done[s] and last[s] < step for s in range(n)):
                    break  # a stage may still give this step
                del pending[step]
                self._apply(kind, step, parts, n)

    def _apply(self, kind: type, step: int, parts: dict[int, object], n: int) -> None:
        in_order = [parts[s] for s in sorted(parts)]
        if kind is records.StepValues:
            self.state.apply(_step_values(step, [p.values for p in in_order]))
        elif len(parts) < n:  # a sampled step a stage lacks: void, never a partial model
            if kind is records.Sampled and step not in self.failed:
                self.failed.add(step)
                self.unmatched.append(step)
                self.state.mark_failed(step)
        elif kind is records.Sampled:
            joined = _sampled(step, in_order)
            if step in self.failed:  # a failure in any stage voids the whole step, as in one monitor
                joined = dataclasses.replace(joined, present=np.zeros_like(joined.present))
            self.state.apply(joined)
        else:
            weight = np.concatenate([p.weight_sq for p in in_order])
            self.state.apply(records.Updates(step, weight, np.concatenate([p.update_sq for p in in_order])))


def _step_of(record: records.Record) -> float:
    return getattr(record, "step", math.inf)


def read_stages(logs: list[Path], history_mib: int | None = None) -> LoggedRun:
    """Read the stages' logs (:func:`stage_logs`, stage order) as one run, into a history of
    ``history_mib`` (None: the budget the run was recorded with) for the whole model's rows.

    Returns:
        The joined run: its state; the first stage's thresholds; closed when every stage's
        log is; every file read; the latest ``first_segment`` of the stages.

    Raises:
        RunLogError: as :func:`~gradscope.run.logfile.read_log` for any stage's log, or
            stages that do not form one model (:func:`merged_info`).
    """
    streams: list[RecordStream] = []
    try:
        for log in logs:
            streams.append(RecordStream(log))
        infos = [stream.info for stream in streams]
        info = merged_info(infos)
        if history_mib is not None:
            info = dataclasses.replace(info, history_mib=history_mib)
        join = _Join(RunState(info), [int(n) for n in np.cumsum([0] + [len(i.rows) for i in infos[:-1]])])
        iterators = [stream.records() for stream in streams]
        done = [False] * len(streams)
        position = [-1.0] * len(streams)
        while not all(done):
            # Read from the stage furthest behind: the pending steps stay few.
            stage = min((s for s in range(len(streams)) if not done[s]), key=lambda s: position[s])
            record = next(iterators[stage], None)
            if record is None:
                done[stage] = True
            else:
                position[stage] = _step_of(record)
                join.take(stage, record)
            join.settle(done)
        join.settle(done, final=True)
        logged = [stream.logged for stream in streams]
    finally:
        for stream in streams:
            stream.close()
    if join.unmatched:
        warnings.warn(
            f"gradscope: {len(join.unmatched)} sampled steps (the first: {join.unmatched[0]}) are missing from some "
            "pipeline stage's log (it failed, or its log ends earlier): read as failed steps",
            GradscopeWarning,
            stacklevel=3,
        )
    return LoggedRun(
        join.state,
        logged[0].thresholds,
        all(each.closed for each in logged),
        [file for each in logged for file in each.files],
        first_segment=max(each.first_segment for each in logged),
    )
