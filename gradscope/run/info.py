"""``RunInfo``: what describes a run as a whole — the header of its log."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from importlib import metadata

import numpy as np

from gradscope.run.budget import HISTORY_MIB

DISTRIBUTION = "gradscope-diagnostics"
"""The name gradscope is installed under (its import name is ``gradscope``)."""


def package_version() -> str:
    """gradscope's version, from the installed package's metadata ("unknown" when it is not
    installed, e.g. run from a source folder on ``sys.path``)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


ROOT_MODULE = "(root)"
"""The name of the watched model itself (as the row of its own parameters is named)."""


@dataclass(frozen=True)
class SiblingGroup:
    """Sibling modules with identical trainable parameters, such as a mixture of experts'
    experts (:attr:`RunInfo.sibling_groups`), with their rows.

    Attributes:
        name: the container module (``"layers.0.experts"``; :data:`ROOT_MODULE` for the model).
        members: the members' module names (``"layers.0.experts.3"``), those with a row.
        rows: int64, each member's row indices: the rows of its module and of the modules in
            it (``"layers.0.experts.3"``, ``"layers.0.experts.3.w1"``), or of its parameters.
    """

    name: str
    members: tuple[str, ...]
    rows: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class RunInfo:
    """What describes a run as a whole (the header of its log).

    Attributes:
        rows: names of the reported rows (layers or parameters).
        row_types: class names of the modules owning them.
        summary: parameters, trainable parameters, bytes and layers of the model.
        every: sampling period.
        mode: ``"backward"`` or ``"step"``.
        granularity: ``"layer"`` or ``"parameter"``.
        history: sampled steps kept in memory.
        hist_history: sampled steps with histograms whose histograms are kept.
        history_mib: MiB the history may take (:mod:`gradscope.run.budget`; the default in
            logs written before it was recorded).
        histogram_every: histograms are computed at one sampled step in this many (and at
            steps whose gradients trigger them; 1: every sampled step, as in logs written
            before it was recorded).
        track_updates: whether update norms are recorded.
        row_numel: elements per row when all its parameters have gradients.
        row_dtypes: the gradient dtype of each row (``"float32"``; the least precise when its
            parameters differ); empty in logs written before it was recorded.
        modules: with forward statistics (``watch(..., forward=True)``), the names of every
            module whose inputs and outputs are measured, in model order (the watched model
            itself is ``"(root)"``); empty otherwise.
        module_types: their class names.
        sibling_groups: groups of sibling modules with identical trainable parameters (the
            experts of a mixture of experts; :mod:`gradscope.monitor.siblings`): container
            module name (``"layers.0.experts"``, ``""`` for the model itself) -> the names of
            its children in the group (``("0", "1", ...)``); empty in logs written before it
            was recorded.
        extra: anything else recorded with the run (versions, creation time).
        tags: the user's labels of the run (``watch(tags={"fold": 2, "lr": 3e-4})``): name ->
            JSON scalar (str, int, float, bool or None); empty in logs written before schema 7.
    """

    rows: tuple[str, ...]
    row_types: tuple[str, ...]
    summary: dict
    every: int
    mode: str
    granularity: str
    history: int
    hist_history: int
    track_updates: bool
    row_numel: tuple[int, ...]
    extra: dict = field(default_factory=dict)
    row_dtypes: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    module_types: tuple[str, ...] = ()
    histogram_every: int = 1
    sibling_groups: dict = field(default_factory=dict)
    history_mib: int = HISTORY_MIB
    tags: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @functools.cached_property
    def sibling_rows(self) -> tuple[SiblingGroup, ...]:
        """:attr:`sibling_groups` with each member's rows (a row belongs to every member whose
        module name is the row's name or a prefix of it at a dot); members without a row (none
        of their parameters watched) are left out. Computed once per run (rows x depth)."""
        where: dict[str, list[tuple[int, int]]] = {}  # member module name -> (group, member) slots
        for g, (container, keys) in enumerate(self.sibling_groups.items()):
            for k, key in enumerate(keys):
                where.setdefault(f"{container}.{key}" if container else key, []).append((g, k))
        found = [[[] for _ in keys] for keys in self.sibling_groups.values()]
        for r, row in enumerate(self.rows):
            parts = row.split(".")
            for depth in range(1, len(parts) + 1):
                for g, k in where.get(".".join(parts[:depth]), ()):
                    found[g][k].append(r)
        groups = []
        for (container, keys), rows in zip(self.sibling_groups.items(), found, strict=True):
            kept = [(f"{container}.{key}" if container else key, r) for key, r in zip(keys, rows, strict=True) if r]
            groups.append(
                SiblingGroup(
                    container or ROOT_MODULE,
                    tuple(member for member, _ in kept),
                    tuple(np.array(r, dtype=np.int64) for _, r in kept),
                )
            )
        return tuple(groups)

    @classmethod
    def from_dict(cls, data: dict) -> RunInfo:
        data = dict(data)
        for name in ("rows", "row_types", "row_numel"):
            data[name] = tuple(data[name])
        for name in ("row_dtypes", "modules", "module_types"):  # absent from older logs
            data[name] = tuple(data.get(name, ()))
        data["sibling_groups"] = {name: tuple(keys) for name, keys in data.get("sibling_groups", {}).items()}
        return cls(**data)
