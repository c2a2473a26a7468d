"""``RunInfo``: what describes a run as a whole — the header of its log."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import metadata

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
        extra: anything else recorded with the run (versions, creation time).
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
    history_mib: int = HISTORY_MIB

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunInfo:
        data = dict(data)
        for name in ("rows", "row_types", "row_numel"):
            data[name] = tuple(data[name])
        for name in ("row_dtypes", "modules", "module_types"):  # absent from older logs
            data[name] = tuple(data.get(name, ()))
        return cls(**data)
