"""The runs of a comparison: loading them, naming them, the layers they share, groups by a tag."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gradscope.health.readout import RunReadout, load_run
from gradscope.run.forward_history import FORWARD_FIELDS
from gradscope.run.history import BUILT_IN_FIELDS

NO_TAG = None
"""The group key of runs that lack the ``by`` tag (shown as ``(no <tag>)``)."""


@dataclass(frozen=True)
class ComparedRun:
    """One run of a comparison.

    Attributes:
        label: how the comparison names it: the path as given, or the loaded run's log
            directory (made unique with ``#<position>`` when two are the same).
        run: the run (a :class:`gradscope.Run`, or a live monitor).
        path: its log directory or file as a string, None for a live monitor.
    """

    label: str
    run: RunReadout
    path: str | None

    @property
    def tags(self) -> dict:
        return self.run.info.tags


def metric_names(compared: ComparedRun) -> tuple[str, ...]:
    """``loss`` and every metric the run logged, in the order first logged."""
    fields = compared.run.fields()
    return ("loss", *(f for f in fields if f not in BUILT_IN_FIELDS and f not in FORWARD_FIELDS))


def load_runs(runs: tuple) -> list[ComparedRun]:
    """The runs of ``compare(*runs)``: each a run-log path (str or ``os.PathLike``) or an
    already loaded run (:func:`gradscope.load_run`'s ``Run``, or a ``Monitor``).

    Raises:
        ValueError: no runs.
        TypeError: something that is neither a path nor a run.
        FileNotFoundError, RunLogError: a path that is not a run log (from :func:`load_run`).
    """
    if not runs:
        raise ValueError("gradscope.compare: no runs given (pass run-log directories or loaded runs)")
    loaded = []
    for position, item in enumerate(runs):
        if isinstance(item, (str, os.PathLike)):
            loaded.append((str(item), load_run(item), str(item)))
        elif isinstance(item, RunReadout):
            files = getattr(item, "files", None)
            path = str(Path(files[0]).parent) if files else None
            loaded.append((path or f"run {position}", item, path))
        else:
            raise TypeError(
                f"gradscope.compare: run {position} is a {type(item).__name__}: pass a run-log directory "
                "(watch(log_dir=...)) or a run loaded with gradscope.load_run"
            )
    labels = [label for label, _, _ in loaded]
    return [
        ComparedRun(label if labels.count(label) == 1 else f"{label}#{position}", run, path)
        for position, (label, run, path) in enumerate(loaded)
    ]


def common_rows(runs: list[ComparedRun]) -> tuple[tuple[str, ...], list[str]]:
    """The row (layer) names every run has, in the first run's order, and notes saying which
    runs have rows the others lack (empty when all runs have the same rows)."""
    first = runs[0].run.rows
    shared = set(first).intersection(*(set(r.run.rows) for r in runs[1:]))
    rows = tuple(row for row in first if row in shared)
    notes = []
    for compared in runs:
        only = [row for row in compared.run.rows if row not in shared]
        if only:
            listed = ", ".join(repr(r) for r in only[:5]) + (f" and {len(only) - 5} more" if len(only) > 5 else "")
            notes.append(f"{compared.label} has layers the other runs lack ({listed}): not compared")
    if notes:
        notes.insert(0, f"the runs' layers differ: comparing the {len(rows)} layers they all have")
    return rows, notes


def group_runs(runs: list[ComparedRun], by: str | None) -> list[tuple[object, list[ComparedRun]]]:
    """The runs grouped by the value of tag ``by`` (one group of all runs when None): groups in
    order of the tag's value (numbers, then strings, then runs without the tag, key
    :data:`NO_TAG`), each with its runs in the order given.

    Raises:
        ValueError: no run has tag ``by`` (the message lists the tags they have).
    """
    if by is None:
        return [(None, list(runs))]
    if not isinstance(by, str):
        raise TypeError(f"gradscope.compare: by must be a tag name, got {by!r}")
    if not any(by in r.tags for r in runs):
        known = sorted({tag for r in runs for tag in r.tags})
        have = f"the runs' tags are {', '.join(map(repr, known))}" if known else "the runs have no tags"
        raise ValueError(f"gradscope.compare: by={by!r}: no run has the tag {by!r} ({have}; watch(tags=...))")
    groups: dict[object, list[ComparedRun]] = {}
    for compared in runs:
        groups.setdefault(_key(compared.tags.get(by, NO_TAG)) if by in compared.tags else NO_TAG, []).append(compared)

    def order(item):
        key = item[0]
        if key is NO_TAG:
            return (3, 0, "")
        if isinstance(key, bool):
            return (1, 0, str(key))
        if isinstance(key, (int, float)):
            return (0, key, "")
        return (2, 0, str(key))

    return sorted(groups.items(), key=order)


def _key(value):
    """A tag value as a group key: a run tagged ``fold=2`` and one tagged ``fold=2.0`` share a group."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
