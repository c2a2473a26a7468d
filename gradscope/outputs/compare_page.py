"""A comparison of runs (:func:`gradscope.compare`) as one self-contained HTML file.

Tables only (no matplotlib needed): the runs and their tags, each metric's mean ± std across
runs and each run's values, the generalisation gaps, every layer's gradient norm per run with
its ratio to the reference run and, beside it, the norm over the shared sampled steps as an
inline SVG line per run (log scale), and the first divergence. No scripts and no fetches (a
Content-Security-Policy forbids them); every name is escaped.
"""

from __future__ import annotations

import html
import os

import numpy as np

from gradscope.comparison.comparison import Comparison
from gradscope.comparison.text import group_name, number, spread

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;width:100%;font-size:.85em;margin:.5em 0}
th,td{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.outlier{color:#c0392b;font-weight:600}.muted{color:#777}
"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A table of already escaped cells (``<td>`` included)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>" + "".join(f"<tr>{''.join(r)}</tr>" for r in rows) + "</table>"


def _num(value) -> str:
    return f'<td class="num">{html.escape(number(value))}</td>'


def _text(value) -> str:
    return f"<td>{html.escape(str(value))}</td>"


RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
"""Line colours of runs [0], [1], ... in the step plots (cycled)."""


def _sparkline(steps, norms_by_run, width: int = 220, height: int = 36) -> str:
    """An inline SVG: one polyline per run of log10(norm) against the step (NaN, 0: gaps)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.asarray(norms_by_run, dtype=np.float64))
    finite = np.isfinite(logs)
    if len(steps) < 2 or not finite.any():
        return '<td class="muted">-</td>'
    low, high = logs[finite].min(), logs[finite].max()
    span = high - low if high > low else 1.0
    x = (np.asarray(steps, dtype=np.float64) - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 2) + 1
    lines = []
    for k, run in enumerate(logs):
        y = height - 1 - (run - low) / span * (height - 2)
        points = " ".join(f"{a:.1f},{b:.1f}" for a, b, ok in zip(x, y, np.isfinite(run), strict=True) if ok)
        colour = RUN_COLOURS[k % len(RUN_COLOURS)]
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="{points}"/>')
    label = f"log10 norm {low:.2f}..{high:.2f}, steps {int(steps[0])}..{int(steps[-1])}"
    return (
        f'<td><svg class="steps" width="{width}" height="{height}" role="img" aria-label="{label}">'
        f"<title>{label}</title>{''.join(lines)}</svg></td>"
    )


def html_comparison(cmp: Comparison, title: str = "gradscope compare") -> str:
    """The comparison as one HTML document (module docstring)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{len(cmp.runs)} runs, {len(cmp.rows)} layers compared; run [0] is the reference.</p>",
    ]
    parts += [f'<p class="muted">{esc(note)}</p>' for note in cmp.notes]
    parts.append("<h2>Runs</h2>")
    parts.append(
        _table(
            ["", "run", "tags"],
            [
                [_text(f"[{i}]"), _text(r.label), _text(", ".join(f"{k}={v}" for k, v in r.tags.items()))]
                for i, r in enumerate(cmp.runs)
            ],
        )
    )
    parts.append("<h2>Metrics</h2>")
    parts.append(
        '<p class="muted">Best: min for losses and errors, max for accuracy-like metrics; mean ± sample std '
        "(ddof=1) across runs; outlier: a best value more than 3.5 robust (median/MAD) and 3.5 leave-one-out "
        "standard deviations from the others (3 runs or more).</p>"
    )
    rows = []
    for m in cmp.metrics.values():
        for g in m.groups:
            if g.runs:
                outliers = ", ".join(g.outliers)
                rows.append(
                    [
                        _text(m.name),
                        _text(group_name(cmp.by, g.key)),
                        _text(spread(g.best) if m.direction else "-"),
                        _text(spread(g.final)),
                        f'<td class="outlier">{esc(outliers)}</td>',
                    ]
                )
    parts.append(_table(["metric", "group", "best", "final", "outliers"], rows))
    for m in cmp.metrics.values():
        header = ["run", *(["best", "at step"] if m.direction else []), "final", "at step"]
        body = [
            [
                _text(f"[{i}] {label}"),
                *([_num(v.best), _num(v.best_step)] if m.direction else []),
                _num(v.final),
                _num(v.final_step),
            ]
            for i, label in enumerate(cmp.labels)
            if (v := m.runs.get(label)) is not None
        ]
        parts.append(f"<h3>{esc(m.name)}</h3>" + _table(header, body))
    if cmp.gaps:
        parts.append("<h2>Generalisation gaps (train − validation, final values)</h2>")
        rows = [
            [
                _text(f"{gap.train} − {gap.validation}"),
                _text(group_name(cmp.by, key)),
                _text(spread(s)),
                _text(", ".join(f"[{cmp.labels.index(label)}] {gap.runs[label]:+.4g}" for label in labels)),
            ]
            for gap in cmp.gaps
            for key, labels, s in gap.groups
            if labels
        ]
        parts.append(_table(["gap", "group", "mean ± std", "per run"], rows))
    t = cmp.layers
    parts.append("<h2>Layers: gradient norm</h2>")
    legend = ", ".join(
        f'<span style="color:{RUN_COLOURS[k % len(RUN_COLOURS)]}">[{k}]</span>' for k in range(len(t.runs))
    )
    parts.append(
        '<p class="muted">Per run: the median over the kept sampled steps, the final value, and the median\'s '
        f"ratio to run [0]'s; over steps: the norm at the sampled steps all runs kept, log scale ({legend}).</p>"
    )
    header = ["layer", "over steps"]
    header += [f"[{k}] {name}" for k in range(len(t.runs)) for name in ("median", "final", "ratio")]
    rows = [
        [_text(row), _sparkline(t.steps, t.norms[:, :, r])]
        + [_num(v) for k in range(len(t.runs)) for v in (t.median[k, r], t.final[k, r], t.ratio[k, r])]
        for r, row in enumerate(t.rows)
    ]
    parts.append(_table(header, rows))
    parts.append("<h2>First divergence</h2>")
    if len(cmp.runs) < 2:
        parts.append("<p>Needs two runs or more.</p>")
    else:
        for label, d in cmp.divergences.items():
            what = "matches run [0]" if d is None else d.message
            parts.append(f"<p>[{cmp.labels.index(label)}] {esc(what)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(cmp: Comparison, path: str | os.PathLike, title: str = "gradscope compare") -> None:
    """Write :func:`html_comparison` to ``path`` (UTF-8)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(html_comparison(cmp, title))
