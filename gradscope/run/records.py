"""The records a run is made of, and their encoding as JSON lines.

A record is what the monitor learns at one moment; :class:`gradscope.run.state.RunState` applies
records, a run log stores them one JSON object per line, and exporters receive them. Bulky
per-row arrays are packed as little-endian binary, compressed with zlib and base64-encoded
inside the JSON object, so a line stays compact and the log stays plain JSON Lines.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from gradscope.stats import layout

SCHEMA = 7
"""Version of the run-log format this gradscope writes (and the newest it reads).

1: the first format. 2: adds the ranks of non-finite gradients to ``sampled`` records and
``desync`` records (distributed runs). 3: adds ``forward`` records (forward statistics) and
the rows' gradient dtypes to the header. 4: adds ``action`` records (what gradscope did about
its findings: gradscope.actions). 5: light rows (``watch(histogram_every=N)``): a ``sampled``
record may say which rows have a histogram (``hist_known``) and then holds only theirs.
6: the header names groups of sibling modules with identical parameters (the experts of a
mixture of experts).
7: the header may carry the run's tags (watch(tags=...)), and ``weights`` records (watch(compression=True)) hold weight statistics.
Older logs are read as before."""  # noqa: E501


@dataclass(frozen=True)
class Header:
    """First line of every log file: what the run is (``info``: ``RunInfo`` fields), the
    thresholds it is judged with, and the histogram's bin edges."""

    info: dict
    thresholds: dict = field(default_factory=dict)
    segment: int = 0
    schema: int = SCHEMA
    hist_edges: list = field(default_factory=lambda: layout.HIST_EDGES.tolist())


@dataclass(frozen=True)
class Sampled:
    """A sampled step: float64 ``(R, ROW_WIDTH)`` rows, bool presence, int backward order.

    Rows without a histogram at this step (light rows) hold NaN in its columns
    (:func:`gradscope.stats.layout.histogram_known`).

    In distributed runs also, per row, the lowest rank whose gradient held NaN/Inf
    (``nonfinite_rank``, -1: none or unknown) and how many ranks did (``nonfinite_ranks``).
    """

    step: int
    rows: np.ndarray
    present: np.ndarray
    order: np.ndarray
    nonfinite_rank: np.ndarray | None = None
    nonfinite_ranks: np.ndarray | None = None


@dataclass(frozen=True)
class Forward:
    """Forward statistics of a sampled step (``watch(..., forward=True)``), for ``M`` modules.

    Attributes:
        step: the sampled step whose forward passes were measured.
        outputs: float64 ``(M, ROW_WIDTH)``, statistics of each module's output tensors (all
            its calls in the step combined); zeros where absent.
        inputs: float64 ``(M, ROW_WIDTH)``, statistics of the input tensors of each module that
            no measured module produced (the batch at the root, tensors computed by a parent's
            own code between its submodules); zeros where there were none.
        order: int64 ``(2, M)``, the position in the step's forward sequence (module calls
            starting = inputs, row 0; module calls returning = outputs, row 1) of the first
            call whose tensors held NaN/Inf, else of the first call; -1 where absent.
        dtypes: per module, the dtype name of its (first floating) output, "" where absent.
        autocast: the autocast dtype during the measured forward ("" when autocast was off).
        nonfinite_rank: int64 ``(2, M)`` in distributed runs (rows combined over the ranks):
            the lowest rank whose tensors of that row held NaN/Inf (-1: none); else None.
    """

    step: int
    outputs: np.ndarray
    inputs: np.ndarray
    order: np.ndarray
    dtypes: tuple[str, ...]
    autocast: str = ""
    nonfinite_rank: np.ndarray | None = None

    @property
    def present(self) -> np.ndarray:
        """bool ``(2, M)``: inputs measured (row 0), outputs measured (row 1)."""
        return self.order >= 0


@dataclass(frozen=True)
class StepValues:
    """A step's scalar values: loss, step_time, peak_memory, energy, grad_scale, step metrics."""

    step: int
    values: dict


@dataclass(frozen=True)
class Metrics:
    """Metrics logged with ``mon.log``, attached to ``step``."""

    step: int
    values: dict


@dataclass(frozen=True)
class Updates:
    """Per-row squared weight and update norms around the optimizer step of ``step``."""

    step: int
    weight_sq: np.ndarray
    update_sq: np.ndarray


@dataclass(frozen=True)
class Desync:
    """DDP replicas disagreed at ``step``: the rows whose gradients differ between ranks,
    and the ranks that differ from the majority."""

    step: int
    rows: tuple[int, ...]
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Action:
    """Something gradscope did to the training run at ``step`` (:mod:`gradscope.actions`).

    Attributes:
        step: the step after which it took effect.
        action: ``"lr"`` (a learning-rate change), ``"halt"`` (``TrainingHalted`` raised)
            or ``"stop"`` (early stopping asked the loop to stop).
        message: one line for a reader: "lr 3e-3 -> 1.5e-3 at step 412 because exploding in 'blocks.3'".
        detail: plain JSON values: for ``"lr"`` ``old``/``new`` (the effective rate of the first
            group concerned), ``scale``, ``groups`` or ``layers``; ``because``: the finding
            behind it as ``{"kind", "layer", "step"}`` (or the metric, for a stop).
    """

    step: int
    action: str
    message: str
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    """gradscope failed during ``step``."""

    step: int


@dataclass(frozen=True)
class Closed:
    """The monitor was closed after ``steps`` steps (absent if the process died first)."""

    steps: int


Record = Header | Sampled | Forward | StepValues | Metrics | Updates | Desync | Action | Failed | Closed


def _pack(arrays: list[tuple[str, np.ndarray]]) -> dict:
    """Arrays as ``{"a": [[name, dtype, shape], ...], "z": base64(zlib(bytes))}``.

    Each array is stored column by column (Fortran order) with its bytes shuffled (all
    first bytes of the elements, then all second bytes, ...): neighbouring values of one
    statistic share their high bytes, which makes zlib about a quarter smaller.
    """
    specs, chunks = [], []
    for name, array in arrays:
        little = np.asarray(array).astype(np.asarray(array).dtype.newbyteorder("<"), copy=False)
        specs.append([name, little.dtype.str, list(little.shape)])
        flat = np.ravel(little, order="F")
        chunks.append(flat.view(np.uint8).reshape(-1, max(flat.itemsize, 1)).T.tobytes())
    return {"a": specs, "z": base64.b64encode(zlib.compress(b"".join(chunks), 6)).decode("ascii")}


def _unpack(obj: dict) -> dict[str, np.ndarray]:
    data = zlib.decompress(base64.b64decode(obj["z"]))
    out, offset = {}, 0
    for name, dtype, shape in obj["a"]:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        size = count * dtype.itemsize
        if offset + size > len(data):
            raise ValueError("packed arrays do not match their description")
        shuffled = np.frombuffer(data, dtype=np.uint8, count=size, offset=offset).reshape(dtype.itemsize, count)
        flat = np.ascontiguousarray(shuffled.T).view(dtype).reshape(-1)
        out[name] = flat.reshape(shape, order="F")
        offset += size
    if offset != len(data):
        raise ValueError("packed arrays do not match their description")
    return out


def _counts(hist: np.ndarray) -> np.ndarray:
    """Histogram counts (float64, exact integers) as the narrowest unsigned type that holds them."""
    return hist.astype(np.uint32 if hist.max(initial=0) < 2**32 else np.uint64)


def _scalars(values: dict) -> dict:
    """Scalar values as JSON numbers; non-finite floats as the strings 'nan', 'inf', '-inf'."""
    return {k: (v if math.isfinite(v) else str(v)) for k, v in ((k, float(v)) for k, v in values.items())}


def _floats(values: dict) -> dict:
    return {k: float(v) for k, v in values.items()}


def encode(record: Record) -> str:
    """One JSON line (without the newline)."""
    if isinstance(record, Header):
        obj = {"t": "header", **asdict(record)}
    elif isinstance(record, Sampled):
        known = layout.histogram_known(record.rows)
        arrays = [
            ("present", record.present.astype(np.uint8)),
            ("order", record.order.astype(np.int32)),
            ("scalars", record.rows[:, : layout.HIST]),
        ]
        if not known.all():  # light rows: say which rows have a histogram, store only theirs
            arrays.append(("hist_known", known.astype(np.uint8)))
        if known.any():
            arrays.append(("hist", _counts(record.rows[known, layout.HIST :])))
        if record.nonfinite_rank is not None:
            arrays.append(("nf_rank", record.nonfinite_rank.astype(np.int32)))
            arrays.append(("nf_ranks", record.nonfinite_ranks.astype(np.int32)))
        obj = {"t": "sampled", "step": int(record.step), **_pack(arrays)}
    elif isinstance(record, Forward):
        both = np.stack([record.inputs, record.outputs])
        counts = _counts(both[..., layout.HIST :])
        arrays = [("order", record.order.astype(np.int64)), ("scalars", both[..., : layout.HIST]), ("hist", counts)]
        if record.nonfinite_rank is not None:
            arrays.append(("nf_rank", record.nonfinite_rank.astype(np.int32)))
        obj = {
            "t": "forward",
            "step": int(record.step),
            "dtypes": list(record.dtypes),
            "autocast": record.autocast,
            **_pack(arrays),
        }
    elif isinstance(record, StepValues):
        obj = {"t": "step", "step": int(record.step), "v": _scalars(record.values)}
    elif isinstance(record, Metrics):
        obj = {"t": "metrics", "step": int(record.step), "v": _scalars(record.values)}
    elif isinstance(record, Updates):
        obj = {"t": "updates", "step": int(record.step), **_pack([("w", record.weight_sq), ("u", record.update_sq)])}
    elif isinstance(record, Desync):
        obj = {"t": "desync", "step": int(record.step), "rows": list(record.rows), "ranks": list(record.ranks)}
    elif isinstance(record, Action):
        obj = {"t": "action", "step": int(record.step), "action": record.action, "message": record.message}
        obj["detail"] = record.detail
    elif isinstance(record, Failed):
        obj = {"t": "failed", "step": int(record.step)}
    elif isinstance(record, Closed):
        obj = {"t": "closed", "steps": int(record.steps)}
    else:
        raise TypeError(f"not a gradscope record: {type(record).__name__}")
    return json.dumps(obj, separators=(",", ":"))


def decode(line: str) -> Record:
    """The record of one JSON line; raises ValueError for anything else."""
    obj = json.loads(line)
    if not isinstance(obj, dict) or "t" not in obj:
        raise ValueError("not a gradscope record")
    kind = obj["t"]
    if kind == "header":
        return Header(
            info=obj["info"], thresholds=obj.get("thresholds", {}), segment=obj["segment"], schema=obj["schema"]
        )
    if kind == "sampled":
        a = _unpack(obj)
        scalars = a["scalars"].astype(np.float64)
        known = a["hist_known"].astype(bool) if "hist_known" in a else np.ones(len(scalars), dtype=bool)
        hist = np.full((len(scalars), layout.NUM_BINS), layout.NO_HISTOGRAM)
        if known.any():
            hist[known] = a["hist"].astype(np.float64)
        rows = np.concatenate([scalars, hist], axis=1)
        ranks = {}
        if "nf_rank" in a:
            ranks = {"nonfinite_rank": a["nf_rank"].astype(np.int64), "nonfinite_ranks": a["nf_ranks"].astype(np.int64)}
        return Sampled(obj["step"], rows, a["present"].astype(bool), a["order"].astype(np.int64), **ranks)
    if kind == "forward":
        a = _unpack(obj)
        both = np.concatenate([a["scalars"].astype(np.float64), a["hist"].astype(np.float64)], axis=-1)
        rank = a["nf_rank"].astype(np.int64) if "nf_rank" in a else None
        return Forward(
            obj["step"],
            both[1],
            both[0],
            a["order"].astype(np.int64),
            tuple(obj["dtypes"]),
            obj.get("autocast", ""),
            rank,
        )
    if kind == "step":
        return StepValues(obj["step"], _floats(obj["v"]))
    if kind == "metrics":
        return Metrics(obj["step"], _floats(obj["v"]))
    if kind == "updates":
        a = _unpack(obj)
        return Updates(obj["step"], a["w"].astype(np.float64), a["u"].astype(np.float64))
    if kind == "desync":
        return Desync(obj["step"], tuple(int(r) for r in obj["rows"]), tuple(int(r) for r in obj["ranks"]))
    if kind == "action":
        return Action(obj["step"], obj["action"], obj["message"], dict(obj.get("detail") or {}))
    if kind == "failed":
        return Failed(obj["step"])
    if kind == "closed":
        return Closed(obj["steps"])
    raise ValueError(f"unknown record type {kind!r}")
