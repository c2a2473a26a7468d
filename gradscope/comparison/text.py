"""A :class:`~gradscope.comparison.comparison.Comparison` as plain text (``print(cmp)``,
``gradscope compare``): the runs, the metrics' summary, the gaps, the layers, the divergence."""

from __future__ import annotations

import math

import numpy as np

MAX_LAYERS = 30
"""Layers the text shows (those whose median norm differs most between runs); JSON and HTML have all."""


def number(value) -> str:
    """A value in a table cell: 4 significant digits, ``-`` where missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def spread(s) -> str:
    """``mean ± std (n)`` of a :class:`~gradscope.comparison.summary.Spread`."""
    if s is None:
        return "-"
    return f"{s.mean:.4g} ± {s.std:.2g} (n={s.n})" if s.n > 1 else f"{s.mean:.4g} (n=1)"


def group_name(by, key) -> str:
    if by is None:
        return "all runs"
    return f"{by}={key}" if key is not None else f"(no {by})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, the first left-aligned, the others right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(header), *(line(r) for r in rows)]


def layer_lines(cmp) -> list[str]:
    """The per-layer table: median norm per run, with its ratio to the reference's."""
    t = cmp.layers
    if not t.rows:
        return ["  (no layer is in every run)"]
    shown = np.arange(len(t.rows))
    if len(t.rows) > MAX_LAYERS:
        with np.errstate(divide="ignore", invalid="ignore"):
            spread_ = np.nan_to_num(np.abs(np.log(t.ratio)), nan=0.0, posinf=1e9).max(axis=0)
        shown = np.sort(np.argsort(-spread_, kind="stable")[:MAX_LAYERS])
    header = ["layer", *(f"[{i}] median (final)" for i in range(len(t.runs)))]
    rows = []
    for r in shown:
        cells = [t.rows[r]]
        for k in range(len(t.runs)):
            ratio = "" if k == 0 else f" x{t.ratio[k, r]:.3g}" if math.isfinite(t.ratio[k, r]) else " x-"
            cells.append(f"{number(t.median[k, r])}{ratio} ({number(t.final[k, r])})")
        rows.append(cells)
    lines = ["  " + line for line in table(header, rows)]
    if len(shown) < len(t.rows):
        lines.append(
            f"  ... {len(t.rows) - len(shown)} more layers (the {len(shown)} shown differ most; --json, --html: all)"
        )
    return lines


def format_comparison(cmp) -> str:
    """The comparison as text (module docstring)."""
    out = [f"gradscope compare: {len(cmp.runs)} runs, {len(cmp.rows)} layers compared"]
    for i, r in enumerate(cmp.runs):
        tags = ", ".join(f"{k}={v}" for k, v in r.tags.items())
        out.append(f"  [{i}] {r.label}" + (f"  ({tags})" if tags else "") + ("  (reference)" if i == 0 else ""))
    out += [f"  note: {note}" for note in cmp.notes]
    out.append("")
    out.append(
        "metrics: best (min for losses/errors, max for accuracy-like) and final; mean ± std across runs (ddof=1)"
    )
    for m in cmp.metrics.values():
        for g in m.groups:
            if not g.runs:
                continue
            best = f"best {spread(g.best)}, " if m.direction else ""
            where = "" if len(cmp.groups) == 1 else f" [{group_name(cmp.by, g.key)}]"
            out.append(f"  {m.name}{where}: {best}final {spread(g.final)}")
            for label in g.outliers:
                out.append(
                    f"    outlier: {label} (best {number(m.runs[label].best)}, robust z {g.robust_z[label]:+.1f})"
                )
        header = ["    run", "best", "at step", "final"] if m.direction else ["    run", "final"]
        rows = []
        for i, label in enumerate(cmp.labels):
            v = m.runs.get(label)
            if v is None:
                continue
            cells = [f"    [{i}]"]
            cells += [number(v.best), "-" if v.best_step is None else str(v.best_step)] if m.direction else []
            rows.append([*cells, number(v.final)])
        out += table(header, rows)
    for gap in cmp.gaps:
        out.append(f"  gap {gap.train} - {gap.validation} (final values):")
        for key, labels, s in gap.groups:
            if labels:
                where = "" if len(cmp.groups) == 1 else f" [{group_name(cmp.by, key)}]"
                per_run = ", ".join(f"[{cmp.labels.index(label)}] {gap.runs[label]:+.4g}" for label in labels)
                out.append(f"    {spread(s)}{where}: {per_run}")
    out.append("")
    out.append("layers: gradient norm, median over the kept sampled steps (final), x ratio to run [0]'s median")
    out += layer_lines(cmp)
    out.append("")
    if len(cmp.runs) < 2:
        out.append("divergence: needs two runs or more")
    else:
        tolerance = "bit for bit" if cmp.exact else f"rtol={cmp.rtol:g}"
        out.append(f"divergence (each run against run [0], {tolerance}):")
        for label, d in cmp.divergences.items():
            out.append(f"  [{cmp.labels.index(label)}] " + ("matches run [0]" if d is None else d.message))
    return "\n".join(out)
