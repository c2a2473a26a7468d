"""The visual report: plots of a run's gradients and loss, as PNG or one self-contained HTML file.

Panels (each drawn by one function of this module onto a matplotlib ``Axes``):

* **gradient flow**: layers x sampled steps, colour = log10 of the gradient rms; absent
  gradients blank, non-finite ones marked red;
* **exact zeros**: layers x sampled steps, colour = fraction of the gradient that is exactly 0;
* **gradient norms**: per-layer norm over steps (log scale), the layers named by findings
  highlighted;
* **histogram ridges**: for a few selected layers, the log2 |g| histogram at evenly spaced
  kept steps, one ridge per step;
* **loss and metrics**: the loss (and logged metrics) over steps, what gradscope did (learning-rate
  changes, a halt, an early stop: solid lines) and each finding marked at the step it began
  (nearby findings share a numbered marker; the numbers are listed below the panel).

:mod:`gradscope.outputs.html_page` puts them, the findings and the layer table in one
self-contained HTML file.

Needs matplotlib (the ``viz`` extra); imported only when a report is drawn. The source is a
live :class:`gradscope.Monitor` or a :class:`gradscope.Run` read back with
:func:`gradscope.load_run`.
"""

from __future__ import annotations

import io
import os
import textwrap
from dataclasses import dataclass

import numpy as np

from gradscope.health.findings import SEVERITIES
from gradscope.health.report import HealthReport
from gradscope.run.forward_history import FORWARD_FIELDS
from gradscope.run.history import BUILT_IN_FIELDS
from gradscope.stats import layout

SEVERITY_COLOURS = {"critical": "#c0392b", "warning": "#e67e22", "info": "#2e86c1"}
MAX_RIDGE_LAYERS = 4
MAX_RIDGES = 12
MAX_HIGHLIGHTED = 8
MAX_LABELLED_ROWS = 40
MARK_SPACING = 0.025
"""Findings whose steps are closer than this fraction of the loss panel's x axis share one
numbered marker (on the 11-inch panel about 24 pixels at 100 dpi: a number never overlaps the
next)."""
LOSS_HEIGHT = 3.6
"""The loss panel's height in inches without its list of findings (a line of the list adds
``LEGEND_LINE_HEIGHT``)."""
LEGEND_LINE_HEIGHT = 0.16
LEGEND_WRAP = 110
"""Characters per line of a finding's entry when the list has one column (it has two when
every entry is at most ``LEGEND_WRAP // 2`` long)."""


def _matplotlib():
    try:
        # Figure objects render without pyplot: no display, no change to the user's backend.
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the visual report needs matplotlib: pip install 'gradscope-diagnostics[viz]'") from None
    return Figure


@dataclass
class RunData:
    """The arrays the panels draw, read once from a monitor or a loaded run."""

    rows: tuple[str, ...]
    sampled_steps: np.ndarray  # (S,)
    rms: np.ndarray  # (S, R), NaN absent
    norm: np.ndarray
    zero_frac: np.ndarray
    nonfinite: np.ndarray
    hist_steps: np.ndarray  # (H,)
    hist: np.ndarray  # (H, R, NUM_BINS)
    loss_steps: np.ndarray
    loss: np.ndarray
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]
    report: HealthReport

    @classmethod
    def of(cls, source, report: HealthReport | None = None) -> RunData:
        """Read ``source`` (a Monitor or a Run)."""
        rms = source.history("rms")
        hist = source.history("hist")
        loss = source.history("loss")
        metrics = {}
        for name in source.fields():
            if name in BUILT_IN_FIELDS or name in FORWARD_FIELDS:
                continue
            series = source.history(name)
            ok = np.isfinite(series.values)
            if ok.any():
                metrics[name] = (series.steps[ok], series.values[ok])
        return cls(
            rows=tuple(source.rows),
            sampled_steps=rms.steps,
            rms=rms.values,
            norm=source.history("norm").values,
            zero_frac=source.history("zero_frac").values,
            nonfinite=source.history("nonfinite").values,
            hist_steps=hist.steps,
            hist=hist.values,
            loss_steps=loss.steps,
            loss=loss.values,
            metrics=metrics,
            report=report if report is not None else source.report(),
        )

    def named_layers(self) -> list[int]:
        """Rows named by findings, most severe first, then the first and last row."""
        out: list[int] = []
        index = {name: r for r, name in enumerate(self.rows)}
        for finding in self.report.findings:
            for name in (finding.layer, *finding.layers):
                if name in index and index[name] not in out:
                    out.append(index[name])
        for r in (0, len(self.rows) - 1):
            if 0 <= r < len(self.rows) and r not in out:
                out.append(r)
        return out


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def _row_ticks(ax, rows: tuple[str, ...]) -> None:
    step = max(1, int(np.ceil(len(rows) / MAX_LABELLED_ROWS)))
    ticks = np.arange(0, len(rows), step)
    ax.set_yticks(ticks)
    ax.set_yticklabels([rows[i] for i in ticks], fontsize=7)


def _extent(steps: np.ndarray, n_rows: int) -> list[float]:
    if len(steps) == 0:
        return [0, 1, n_rows - 0.5, -0.5]
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    return [steps[0] - half, steps[-1] + half, n_rows - 0.5, -0.5]


def draw_gradient_flow(ax, data: RunData) -> None:
    """Heatmap of log10 rms, layers (rows, model order top to bottom) x sampled steps."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_rms = np.log10(np.where(data.rms > 0, data.rms, np.nan))
    image = ax.imshow(
        log_rms.T,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=_extent(data.sampled_steps, len(data.rows)),
    )
    bad = (np.nan_to_num(data.nonfinite) > 0).T
    zero = (data.rms == 0).T & ~bad
    if bad.any() or zero.any():
        overlay = np.zeros((*bad.shape, 4))
        overlay[zero] = (0.25, 0.25, 0.25, 1.0)  # dark grey: a gradient that is exactly zero everywhere
        overlay[bad] = (0.85, 0.1, 0.1, 1.0)  # red: the gradient held NaN/Inf
        ax.imshow(overlay, aspect="auto", interpolation="nearest", extent=_extent(data.sampled_steps, len(data.rows)))
    ax.figure.colorbar(image, ax=ax, label="log10 gradient rms", pad=0.01)
    _row_ticks(ax, data.rows)
    ax.set_xlabel("step")
    ax.set_title("Gradient flow: log10 rms per layer (white: no gradient; grey: all zero; red: NaN/Inf)", fontsize=10)


def draw_zero_fraction(ax, data: RunData) -> None:
    """Heatmap of the fraction of exact zeros, layers x sampled steps."""
    image = ax.imshow(
        data.zero_frac.T,
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        vmin=0,
        vmax=1,
        extent=_extent(data.sampled_steps, len(data.rows)),
    )
    ax.figure.colorbar(image, ax=ax, label="fraction exactly 0", pad=0.01)
    _row_ticks(ax, data.rows)
    ax.set_xlabel("step")
    ax.set_title("Exact zeros: fraction of each layer's gradient", fontsize=10)


def draw_norms(ax, data: RunData) -> None:
    """Per-layer gradient norm over sampled steps; the layers named by findings in colour."""
    highlighted = data.named_layers()[:MAX_HIGHLIGHTED]
    steps = data.sampled_steps
    with np.errstate(invalid="ignore"):
        norm = np.where(data.norm > 0, data.norm, np.nan)
    for r in range(len(data.rows)):
        if r not in highlighted:
            ax.plot(steps, norm[:, r], color="0.75", linewidth=0.6)
    for r in highlighted:
        ax.plot(steps, norm[:, r], linewidth=1.4, label=data.rows[r])
    if np.isfinite(norm).any():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.set_title("Gradient norm per layer (grey: the other layers)", fontsize=10)
    if highlighted:
        ax.legend(fontsize=7, loc="best", ncol=2)


def ridge_layers(data: RunData) -> list[int]:
    """Up to ``MAX_RIDGE_LAYERS`` rows: those named by findings first, then spread over the model."""
    chosen = [r for r in data.named_layers() if np.nansum(data.hist[:, r]) > 0][:MAX_RIDGE_LAYERS]
    for r in np.linspace(0, len(data.rows) - 1, MAX_RIDGE_LAYERS).round().astype(int):
        if len(chosen) >= MAX_RIDGE_LAYERS:
            break
        if r not in chosen and np.nansum(data.hist[:, r]) > 0:
            chosen.append(int(r))
    return chosen


def draw_ridges(ax, data: RunData, row: int) -> None:
    """The log2 |g| histogram of ``row`` at up to ``MAX_RIDGES`` evenly spaced kept steps."""
    counts = np.nan_to_num(data.hist[:, row])  # (H, NUM_BINS)
    kept = np.flatnonzero(counts.sum(axis=1) > 0)
    if len(kept) > MAX_RIDGES:
        kept = kept[np.linspace(0, len(kept) - 1, MAX_RIDGES).round().astype(int)]
    exponents = np.arange(layout.NUM_BINS) + layout.HIST_MIN_EXPONENT + 0.5
    used = np.flatnonzero(counts[kept].sum(axis=0)) if len(kept) else np.array([], int)
    if len(used):
        lo, hi = exponents[max(used[0] - 1, 0)], exponents[min(used[-1] + 1, layout.NUM_BINS - 1)]
        ax.set_xlim(lo - 0.5, hi + 0.5)
    colours = _colormap("viridis")(np.linspace(0.15, 0.9, max(len(kept), 1)))
    for level, i in enumerate(kept[::-1]):  # the latest at the bottom, in front
        shape = counts[i] / counts[i].max()
        colour = colours[len(kept) - 1 - level]
        ax.fill_between(exponents, level, level + 0.9 * shape, step="mid", color=colour, alpha=0.9, zorder=-level)
        ax.plot(exponents, level + 0.9 * shape, drawstyle="steps-mid", color="black", linewidth=0.5, zorder=-level)
    ax.set_yticks(np.arange(len(kept)))
    ax.set_yticklabels([f"step {int(data.hist_steps[i])}" for i in kept[::-1]], fontsize=6)
    ax.set_xlabel("log2 |g|")
    ax.set_title(data.rows[row], fontsize=9)


def draw_loss(ax, data: RunData) -> None:
    """Loss and logged metrics over steps; each group of nearby findings marked by a numbered
    line at the step it began and listed below the axes, in a legend of the figure (or
    subfigure) ``ax`` is on: labels beside the lines would overlap where findings crowd."""
    if len(data.loss_steps):
        ax.plot(data.loss_steps, data.loss, color="0.2", linewidth=0.8, label="loss")
    losses = {k: v for k, v in data.metrics.items() if "loss" in k or "ppl" in k or "perplexity" in k}
    for name, (steps, values) in losses.items():
        ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    others = {k: v for k, v in data.metrics.items() if k not in losses}
    if others:
        twin = ax.twinx()
        for name, (steps, values) in others.items():
            twin.plot(steps, values, linestyle="--", marker=".", linewidth=1.0, label=name)
        twin.set_ylabel("metrics (dashed)")
        twin.legend(fontsize=7, loc="lower left")
    ax.set_xlim(*loss_xlim(data))  # fixed first: the markers' spacing is a fraction of it
    groups = finding_groups(data)
    handles = []
    for number, group in enumerate(groups, 1):
        colour = _group_colour(group)
        for mark in group:
            ax.axvline(mark.step, color=SEVERITY_COLOURS.get(mark.severity, "0.5"), linestyle=":", linewidth=1.2)
        ax.annotate(
            str(number),
            xy=(group[0].step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(0, -2),
            textcoords="offset points",
            fontsize=7,
            fontweight="bold",
            color=colour,
            ha="center",
            va="top",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": colour, "linewidth": 0.6},
        )
        handles.append(_line2d(colour))
    _draw_actions(ax, data.report.actions)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    if groups:
        labels, columns = finding_labels(groups)
        ax.figure.legend(
            handles, labels, loc="outside lower center", ncols=columns, fontsize=7, frameon=False, handlelength=1.5
        )
    title = "Loss and metrics; findings numbered at the first step the report sees them (listed below)"
    if data.report.actions:
        title += "; what gradscope did: solid lines"
    ax.set_title(title, fontsize=10)


@dataclass(frozen=True)
class FindingMark:
    """A finding where the loss panel marks it: the step it began (``since_step``)."""

    step: int
    kind: str
    layer: str | None
    severity: str


def loss_xlim(data: RunData) -> tuple[float, float]:
    """The loss panel's step range: every loss, metric, finding and action step, with a 5% margin."""
    steps = [data.loss_steps, *(s for s, _ in data.metrics.values())]
    steps += [np.array([m.step for m in _marks(data)] + [a["step"] for a in data.report.actions], dtype=float)]
    every = np.concatenate([np.asarray(s, dtype=float).ravel() for s in steps])
    every = every[np.isfinite(every)]
    if len(every) == 0:
        return 0.0, 1.0
    lo, hi = float(every.min()), float(every.max())
    margin = 0.05 * (hi - lo) if hi > lo else 0.5
    return lo - margin, hi + margin


def _marks(data: RunData) -> list[FindingMark]:
    marks = [
        FindingMark(f.since_step if f.since_step is not None else f.step, f.kind, f.layer, f.severity)
        for f in data.report.findings
    ]
    return sorted(marks, key=lambda m: m.step)


def finding_groups(data: RunData) -> list[list[FindingMark]]:
    """The findings in step order, those closer than ``MARK_SPACING`` of the x range to the
    first of a group joining it: one numbered marker each."""
    lo, hi = loss_xlim(data)
    spacing = MARK_SPACING * (hi - lo)
    groups: list[list[FindingMark]] = []
    for mark in _marks(data):
        if groups and mark.step - groups[-1][0].step < spacing:
            groups[-1].append(mark)
        else:
            groups.append([mark])
    return groups


def finding_labels(groups: list[list[FindingMark]]) -> tuple[list[str], int]:
    """The list's entries (``"1: step 60: nonfinite (blocks.4.linear)"``) and its columns."""
    labels = []
    for number, group in enumerate(groups, 1):
        first, last = group[0].step, group[-1].step
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
        labels.append(f"{number}: {steps}: {_group_label(group)}")
    if max(len(label) for label in labels) <= LEGEND_WRAP // 2:
        return labels, 2
    return [textwrap.fill(label, LEGEND_WRAP, subsequent_indent="    ") for label in labels], 1


def loss_height(data: RunData) -> float:
    """The loss panel's height in inches: ``LOSS_HEIGHT`` and a line per row of the findings' list."""
    groups = finding_groups(data)
    if not groups:
        return LOSS_HEIGHT
    labels, columns = finding_labels(groups)
    lines = sum(label.count("\n") + 1 for label in labels) if columns == 1 else -(-len(labels) // columns)
    return LOSS_HEIGHT + LEGEND_LINE_HEIGHT * (lines + 1)  # one more for the legend's padding


def _group_colour(group: list[FindingMark]) -> str:
    """The colour of the group's most severe finding."""
    worst = max(group, key=lambda m: SEVERITIES.index(m.severity))
    return SEVERITY_COLOURS.get(worst.severity, "0.5")


def _line2d(colour: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, linestyle=":", linewidth=1.2)


ACTION_COLOURS = {"lr": "tab:blue", "halt": "tab:red", "stop": "tab:green"}


def _draw_actions(ax, actions) -> None:
    """What gradscope did (:mod:`gradscope.actions`): a solid line at the step of each
    learning-rate change ("lr x0.5"), halt or early stop, labelled at mid-height."""
    for action in actions:
        colour = ACTION_COLOURS.get(action["action"], "0.3")
        ax.axvline(action["step"], color=colour, linestyle="-", linewidth=1.0, alpha=0.7)
        detail = action.get("detail") or {}
        if action["action"] == "lr" and detail.get("old_scale"):
            label = f"lr x{detail['scale'] / detail['old_scale']:g}"
            if detail.get("layers"):
                label += f" {detail['layers'][0]}"
        else:
            label = {"halt": "halted", "stop": "early stop"}.get(action["action"], action["action"])
        ax.annotate(
            label,
            xy=(action["step"], 0.5),  # mid-height: findings are labelled at the top, legends sit low
            xycoords=("data", "axes fraction"),
            xytext=(3, 0),
            textcoords="offset points",
            rotation=90,
            fontsize=7,
            color=colour,
            ha="left",
            va="center",
        )


def _group_label(group: list[FindingMark]) -> str:
    """``kind (layer)`` per kind, ``kind (N layers)`` when a kind names several layers."""
    kinds: dict[str, list] = {}
    for mark in group:
        kinds.setdefault(mark.kind, [])
        if mark.layer and mark.layer not in kinds[mark.kind]:
            kinds[mark.kind].append(mark.layer)
    parts = []
    for kind, layers in kinds.items():
        parts.append(kind + (f" ({layers[0]})" if len(layers) == 1 else f" ({len(layers)} layers)" if layers else ""))
    return "; ".join(parts)


PANELS = ("gradient_flow", "zero_fraction", "norms", "ridges", "loss")


def figure(data: RunData, panel: str):
    """One panel as its own matplotlib ``Figure``."""
    Figure = _matplotlib()
    n_rows = len(data.rows)
    heat_height = min(2.5 + 0.12 * n_rows, 12)
    if panel == "gradient_flow":
        fig = Figure(figsize=(11, heat_height), layout="constrained")
        draw_gradient_flow(fig.add_subplot(), data)
    elif panel == "zero_fraction":
        fig = Figure(figsize=(11, heat_height), layout="constrained")
        draw_zero_fraction(fig.add_subplot(), data)
    elif panel == "norms":
        fig = Figure(figsize=(11, 4), layout="constrained")
        draw_norms(fig.add_subplot(), data)
    elif panel == "ridges":
        rows = ridge_layers(data)
        fig = Figure(figsize=(11, 3.6), layout="constrained")
        if not rows:
            fig.text(0.5, 0.5, "no histograms kept", ha="center")
        for i, row in enumerate(rows):
            draw_ridges(fig.add_subplot(1, len(rows), i + 1), data, row)
        fig.suptitle("Histogram ridges: log2 |g| over time (latest at the bottom)", fontsize=10)
    elif panel == "loss":
        fig = Figure(figsize=(11, loss_height(data)), layout="constrained")
        draw_loss(fig.add_subplot(), data)
    else:
        raise ValueError(f"unknown panel {panel!r}; choose from {', '.join(PANELS)}")
    return fig


def png_bytes(fig, dpi: int = 100) -> bytes:
    """A figure rendered as PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def write_png(source, path: str | os.PathLike, report: HealthReport | None = None, dpi: int = 100) -> None:
    """All panels stacked in one PNG file."""
    Figure = _matplotlib()
    data = RunData.of(source, report)
    heat_height = min(2.5 + 0.12 * len(data.rows), 12)
    heights = [heat_height, heat_height, 4, 3.6, loss_height(data)]
    fig = Figure(figsize=(11, sum(heights)), layout="constrained")
    top = fig.subfigures(len(heights), 1, height_ratios=heights)
    draw_gradient_flow(top[0].add_subplot(), data)
    draw_zero_fraction(top[1].add_subplot(), data)
    draw_norms(top[2].add_subplot(), data)
    rows = ridge_layers(data)
    for i, row in enumerate(rows):
        draw_ridges(top[3].add_subplot(1, len(rows), i + 1), data, row)
    top[3].suptitle("Histogram ridges: log2 |g| over time (latest at the bottom)", fontsize=10)
    draw_loss(top[4].add_subplot(), data)
    status = data.report.status.upper()
    n = len(data.report.findings)
    fig.suptitle(f"gradscope: {status} at step {data.report.step}, {n} finding{'' if n == 1 else 's'}", fontsize=12)
    with open(path, "wb") as handle:
        handle.write(png_bytes(fig, dpi))
