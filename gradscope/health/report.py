"""``HealthReport``: the verdict on a training run — status, findings, layers, resources.

:func:`assess` judges a :class:`~gradscope.run.state.RunState`: it cuts the checks' view out
of it (:func:`gradscope.health.view.view_of`), runs every check of
:data:`gradscope.health.checks.CHECKS`, links consequences to their causes
(:func:`gradscope.health.causes.link`) and assembles the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

from gradscope.health.causes import describe, link, refers_to
from gradscope.health.checks import CHECKS
from gradscope.health.compression import CompressionReport, judge_compression
from gradscope.health.findings import SEVERITIES, Finding
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import RunView, view_of
from gradscope.run.state import RunState
from gradscope.stats import formats

STATUSES = ("healthy", "warning", "critical")


@dataclass(frozen=True)
class LayerHealth:
    """One row of the report: a layer's gradient at its latest sampled step with a gradient.

    ``status`` is the most severe finding concerning the layer (``"healthy"`` if none), or
    ``"absent"`` when the layer had no gradient in the report's window. Values are None
    when absent. ``norm``, ``rms`` and ``max_abs`` are over the gradient's finite elements;
    ``nonfinite`` counts its NaN and Inf elements (the printed report shows ``nan`` for the
    three when it is above 0, never the finite elements' numbers alone). ``dtype`` is the
    gradient's dtype; ``fp8_e4m3_zero`` and ``fp8_e5m2_zero`` are FP8 readiness: the fraction
    of its finite non-zero values that a cast to that format with per-tensor amax scaling
    would flush to zero (:mod:`gradscope.stats.formats`; None when the histogram is not kept).
    ``hist`` and the FP8 figures come from the layer's newest histogram, computed at
    ``hist_step`` (histograms come on a cadence, ``watch(histogram_every=)``, so it may be
    older than the other values' step).
    """

    name: str
    type: str
    numel: int
    norm: float | None
    rms: float | None
    max_abs: float | None
    zero_frac: float | None
    hist: list[int] | None
    update_ratio: float | None
    status: str
    nonfinite: int | None = None
    dtype: str | None = None
    fp8_e4m3_zero: float | None = None
    fp8_e5m2_zero: float | None = None
    hist_step: int | None = None

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class HealthReport:
    """What :meth:`gradscope.Monitor.report` returns.

    Attributes:
        status: ``"healthy"``, ``"warning"`` or ``"critical"``: the most severe finding
            (``info`` findings, such as a plateau, leave a run healthy).
        findings: root causes, most severe first, each followed by its consequences (the
            findings whose ``cause`` names it; see :mod:`gradscope.health.causes`).
        first_nonfinite: ``(step, layer)`` of the first gradient to hold NaN/Inf (first in
            backward order at the first such step), or None.
        layers: one :class:`LayerHealth` per row.
        resources: step time (median and p95, seconds), peak memory (bytes), energy (J)
            when known, the gradient noise scale ``B_simple`` (DDP with gradscope's hook),
            the world size of a distributed run, parameter count, trainable count, bytes
            and layers (:func:`format_resource` writes a value for people).
        step: the latest step the report covers (-1 before the first step).
        note: a remark about the report itself (for example, that there are no steps yet,
            or that some sampled steps' statistics are still in flight).
        actions: what gradscope did about its findings (:mod:`gradscope.actions`), oldest
            first: dicts with ``step``, ``action`` (``"lr"``, ``"halt"``, ``"stop"``),
            ``message`` and ``detail``.
        compression: what could be quantized or pruned
            (:class:`~gradscope.health.compression.CompressionReport`), with
            ``watch(..., compression=True)``; None otherwise.
    """

    status: str
    findings: tuple[Finding, ...]
    first_nonfinite: tuple[int, str] | None
    layers: tuple[LayerHealth, ...]
    resources: dict
    step: int
    note: str | None = None
    actions: tuple[dict, ...] = ()
    compression: CompressionReport | None = None

    def to_dict(self) -> dict:
        """Plain JSON types only."""
        return _plain(
            {
                "status": self.status,
                "step": self.step,
                "note": self.note,
                "first_nonfinite": list(self.first_nonfinite) if self.first_nonfinite else None,
                "findings": [f.to_dict() for f in self.findings],
                "layers": [layer.to_dict() for layer in self.layers],
                "resources": self.resources,
                "actions": list(self.actions),
                "compression": self.compression.to_dict() if self.compression is not None else None,
            }
        )

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @property
    def root_causes(self) -> tuple[Finding, ...]:
        """The findings no other finding of the report explains, in report order: what to fix
        first. A finding explained by an event that is not a finding (a learning-rate increase)
        is among them."""
        return tuple(f for f in self.findings if not self._explained(f))

    def consequences(self, finding: Finding) -> tuple[Finding, ...]:
        """The findings whose ``cause`` is ``finding``."""
        return tuple(f for f in self.findings if f is not finding and refers_to(f.cause, finding))

    def _explained(self, finding: Finding) -> bool:
        return any(g is not finding and refers_to(finding.cause, g) for g in self.findings)

    def __str__(self) -> str:
        lines = [f"gradscope health: {self.status.upper()} at step {self.step} ({len(self.findings)} findings)"]
        if self.note:
            lines.append(f"  {self.note}")
        if self.layers:
            lines.append(
                f"  {'layer':<28} {'type':<12} {'numel':>10} {'norm':>9} {'rms':>9} {'max|g|':>9} "
                f"{'zero%':>6} {'nonfin':>6} {'upd/w':>8}  status"
            )
            for row in self.layers:
                name = row.name if len(row.name) <= 28 else "…" + row.name[-27:]
                bad = bool(row.nonfinite)  # finite elements' numbers would read as a healthy (or zero) gradient
                nonfin = "-" if row.nonfinite is None else str(row.nonfinite)
                lines.append(
                    f"  {name:<28} {row.type[:12]:<12} {row.numel:>10d} {_num(row.norm, bad):>9} "
                    f"{_num(row.rms, bad):>9} {_num(row.max_abs, bad):>9} {_pct(row.zero_frac):>6} {nonfin:>6} "
                    f"{_num(row.update_ratio):>8}  {row.status}"
                )
        if self.findings:
            lines.append("  findings, root causes first (most severe first), each followed by its consequences (↳):")
            suggested = set()
            for f in self.findings:
                where = f" in '{f.layer}'" if f.layer else ""
                after = f" ({describe(f.cause)})" if f.cause else ""
                indent = "      ↳ " if self._explained(f) else "  "
                lines.append(f"{indent}[{f.severity}] {f.kind}{where}, step {f.step}: {f.message}{after}")
                if f.suggestion not in suggested:  # each advice once, at its first finding
                    lines.append(f"{' ' * len(indent)}    try: {f.suggestion}")
                    suggested.add(f.suggestion)
        if self.actions:
            lines.append("  actions taken:")
            lines += [f"    {action['message']}" for action in self.actions]
        if self.compression is not None:
            lines.append(str(self.compression))
        if self.resources:
            parts = [f"{key}={format_resource(key, value)}" for key, value in self.resources.items()]
            lines.append("  resources: " + ", ".join(parts))
        return "\n".join(lines)


def assess(state: RunState, thresholds: Thresholds, in_flight: tuple[int, ...] = ()) -> HealthReport:
    """The health report of the run ``state`` describes, judged with ``thresholds``.

    ``in_flight``: sampled steps whose statistics have not reached the host yet (on the
    device, or in a collective); the report's note names them.

    Raises:
        TypeError: ``thresholds`` is not a :class:`gradscope.Thresholds`.
    """
    if not isinstance(thresholds, Thresholds):
        raise TypeError(f"report: thresholds must be a gradscope.Thresholds, got {type(thresholds).__name__}")
    info = state.info
    report = build(view_of(state, thresholds), thresholds, info.rows, info.row_types, info.summary, in_flight)
    compression = judge_compression(state.weights, info.rows, info.row_types)
    return report if compression is None else dataclasses.replace(report, compression=compression)


def build(
    view: RunView | None,
    thresholds: Thresholds,
    rows: tuple[str, ...],
    row_types: tuple[str, ...],
    summary: dict,
    in_flight: tuple[int, ...] = (),
) -> HealthReport:
    """Run every check on ``view``, link consequences to causes and assemble the report
    (``view`` None: no steps yet; ``in_flight`` as for :func:`assess`)."""
    waiting = _in_flight_note(in_flight)
    if view is None or (len(view.steps) == 0 and len(view.sampled_steps) == 0):
        layers = tuple(
            LayerHealth(n, t, 0, None, None, None, None, None, None, "absent")
            for n, t in zip(rows, row_types, strict=True)
        )
        note = "no steps recorded yet: nothing to judge"
        if waiting:
            note = f"no steps have reached the host yet: nothing to judge; {waiting}"
        return HealthReport("healthy", (), None, layers, dict(summary), -1, note=note)
    findings, notes = judge(view, thresholds)
    if waiting:
        notes.append(waiting)
    worst = max((f.severity_level for f in findings), default=0)
    status = STATUSES[worst] if worst > 0 else "healthy"
    gradients = [f for f in findings if f.kind == "nonfinite" and f.layer is not None]
    first = min(gradients, key=lambda f: f.since_step, default=None)
    step = int(
        max(view.steps[-1] if len(view.steps) else -1, view.sampled_steps[-1] if len(view.sampled_steps) else -1)
    )
    return HealthReport(
        status=status,
        findings=tuple(findings),
        first_nonfinite=(first.since_step, first.layer) if first else None,
        layers=_layers(view, findings),
        resources=_resources(view),
        step=step,
        note="; ".join(notes) if notes else None,
        actions=tuple(
            {"step": a.step, "action": a.action, "message": a.message, "detail": a.detail} for a in view.actions
        ),
    )


def judge(view: RunView, thresholds: Thresholds) -> tuple[list[Finding], list[str]]:
    """The findings of every check on ``view``, most severe first, consequences linked to
    their causes, and notes on checks that failed: the report without its layer table
    (what acting on findings needs, at a fraction of the cost)."""
    findings, failed, notes = [], [], []
    for check in CHECKS:
        try:
            findings += check(view, thresholds)
        except Exception as error:  # a broken check must not take the report (or training) down
            failed.append(f"{check.__module__.rsplit('.', 1)[-1]}: {type(error).__name__}: {error}")
    if failed:
        notes.append("checks that failed: " + "; ".join(failed))
    findings.sort(key=lambda f: (-f.severity_level, f.since_step))
    try:
        findings = link(findings, view, thresholds)
    except Exception as error:  # as for a check: the findings stand without their causes
        notes.append(f"linking findings to their causes failed ({type(error).__name__}: {error}): shown unlinked")
    return findings, notes


def _in_flight_note(steps: tuple[int, ...]) -> str | None:
    """What the report does not include yet: "statistics of sampled step 41 are still in flight ..."."""
    steps = sorted({int(s) for s in steps})
    if not steps:
        return None
    if len(steps) == 1:
        which = f"sampled step {steps[0]}"
    elif steps[-1] - steps[0] == len(steps) - 1:
        which = f"sampled steps {steps[0]}-{steps[-1]}"
    elif len(steps) <= 4:
        which = "sampled steps " + ", ".join(map(str, steps[:-1])) + f" and {steps[-1]}"
    else:
        which = f"{len(steps)} sampled steps ({steps[0]} to {steps[-1]})"
    return (
        f"statistics of {which} are still in flight (on the device or in a collective); "
        "report(wait=True) waits for them"
    )


def _layers(view: RunView, findings: list[Finding]) -> tuple[LayerHealth, ...]:
    status = {}
    for f in findings:
        if f.severity_level == 0:
            continue
        for name in f.layers:
            if SEVERITIES.index(status.get(name, "info")) < f.severity_level:
                status[name] = f.severity
    if len(view.sampled_steps) == 0:
        return tuple(
            LayerHealth(n, t, 0, None, None, None, None, None, None, "absent")
            for n, t in zip(view.rows, view.row_types, strict=True)
        )
    rms, norm, zero_frac = view.rms, view.norm, view.zero_frac
    out = []
    for r, (name, kind) in enumerate(zip(view.rows, view.row_types, strict=True)):
        seen = np.flatnonzero(view.present[:, r])
        if not seen.size:  # no gradient in the window (frozen, unused)
            out.append(LayerHealth(name, kind, 0, None, None, None, None, None, None, "absent"))
            continue
        i = seen[-1]  # the row's latest sampled step with a gradient
        ratio = view.update_ratio[i, r] if view.update_ratio is not None else np.nan
        nonfinite = view.nonfinite[i, r]
        hist = view.latest_hist[r] if view.latest_hist is not None else None
        hist = None if hist is None or np.isnan(hist).any() else hist  # none kept
        fp8 = formats.fp8_fields(hist, view.latest_hist_max_abs[r]) if hist is not None else {}
        fp8 = {name: float(value) if np.isfinite(value) else None for name, value in fp8.items()}
        out.append(
            LayerHealth(
                name=name,
                type=kind,
                numel=int(view.numel[i, r]),
                norm=float(norm[i, r]),
                rms=float(rms[i, r]),
                max_abs=float(view.max_abs[i, r]),
                zero_frac=float(zero_frac[i, r]),
                hist=hist.astype(np.int64).tolist() if hist is not None else None,
                update_ratio=float(ratio) if np.isfinite(ratio) else None,
                status=status.get(name, "healthy"),
                nonfinite=int(nonfinite) if np.isfinite(nonfinite) else None,
                dtype=view.row_dtypes[r] if len(view.row_dtypes) == len(view.rows) else None,
                fp8_e4m3_zero=fp8.get("fp8_e4m3_zero"),
                fp8_e5m2_zero=fp8.get("fp8_e5m2_zero"),
                hist_step=int(view.latest_hist_step[r]) if hist is not None else None,
            )
        )
    return tuple(out)


def _resources(view: RunView) -> dict:
    out = {}
    times = view.step_time[np.isfinite(view.step_time)]
    if len(times):
        out["step_time_median_s"] = float(np.median(times))
        out["step_time_p95_s"] = float(np.percentile(times, 95))
    memory = view.peak_memory[np.isfinite(view.peak_memory)]
    if len(memory):
        out["peak_memory_bytes"] = float(memory.max())
    energy = view.energy[np.isfinite(view.energy)]
    if len(energy):
        out["energy_j"] = float(energy.sum())
        out["energy_per_step_median_j"] = float(np.median(energy))
    noise = view.metrics.get("noise_scale")
    if noise is not None and len(noise[1]):
        out["noise_scale"] = float(noise[1][-1])  # B_simple, the EMA at the latest step
    if view.world > 1:
        out["world_size"] = view.world
    out.update(view.summary)
    return out


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _num(value, nonfinite: bool = False) -> str:
    if value is None:
        return "-"
    return "nan" if nonfinite else f"{value:.2e}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


RESOURCE_UNITS = {
    "_s": ((1e-6, "µs"), (1e-3, "ms"), (1.0, "s")),
    "bytes": ((1.0, "B"), (2.0**10, "KiB"), (2.0**20, "MiB"), (2.0**30, "GiB"), (2.0**40, "TiB")),
    "_j": ((1.0, "J"), (1e3, "kJ"), (1e6, "MJ"), (1e9, "GJ")),
}
"""The units of :attr:`HealthReport.resources`, by how the key ends: seconds (``_s``), bytes
(``bytes``; binary prefixes) and joules (``_j``), each unit as ``(size, name)``, smallest first."""


def format_resource(key: str, value) -> str:
    """One value of :attr:`HealthReport.resources` for people (the printed report and the HTML
    page show it so).

    A value in seconds, bytes or joules (``RESOURCE_UNITS``) in the largest unit it reaches,
    with 4 significant digits (``0.157427476`` s: ``"157.4 ms"``; ``3.2e9`` bytes:
    ``"2.98 GiB"``); a count with thousands separators (``"1,234,567"``); another float with 4
    significant digits; anything else as ``str``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if not math.isfinite(value):
        return str(float(value))
    units = next((units for ending, units in RESOURCE_UNITS.items() if key.endswith(ending)), None)
    if units is not None:
        reached = [unit for unit in units if abs(value) >= unit[0]]
        size, name = reached[-1] if reached else units[0]
        if value == 0:
            size, name = next(unit for unit in units if unit[0] == 1.0)
        return f"{value / size:.4g} {name}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):.4g}"
