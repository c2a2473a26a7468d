"""The visual report as one self-contained HTML file: findings, panels, layers, resources.

Every image is inlined as a data URI and a Content-Security-Policy forbids any fetch, so
the file can be mailed, attached to a CI run or opened offline; every name is escaped. The
panels are those of :mod:`gradscope.outputs.visual` (matplotlib, the ``viz`` extra).
"""

from __future__ import annotations

import base64
import datetime
import html
import os

from gradscope.health.causes import describe
from gradscope.health.report import HealthReport, format_resource
from gradscope.outputs.visual import RunData, figure, png_bytes

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
.status{display:inline-block;padding:.15em .6em;border-radius:.3em;color:#fff;font-weight:600}
.healthy{background:#27ae60}.warning{background:#e67e22}.critical{background:#c0392b}.info{background:#2e86c1}
table{border-collapse:collapse;width:100%;font-size:.85em}
th,td{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;display:block;margin:.5em 0}
.muted{color:#777}
"""


def _cell(value, kind: str = "num") -> str:
    if value is None:
        return '<td class="num">-</td>'
    if kind == "pct":
        return f'<td class="num">{100 * value:.1f}%</td>'
    if kind == "int":
        return f'<td class="num">{int(value):,}</td>'
    return f'<td class="num">{value:.3g}</td>'


def html_report(source, report: HealthReport | None = None, title: str = "gradscope run") -> str:
    """The visual report as one HTML document: images inlined as data URIs, no scripts, no
    network fetches (a Content-Security-Policy forbids them), every name escaped."""
    data = RunData.of(source, report)
    report = data.report
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p><span class="status {esc(report.status)}">{esc(report.status.upper())}</span> '
        f"at step {report.step}: {len(report.findings)} findings, {len(data.rows)} layers. "
        f'<span class="muted">Written {datetime.datetime.now().isoformat(timespec="seconds")}.</span></p>',
    ]
    if report.note:
        parts.append(f'<p class="muted">{esc(report.note)}</p>')
    parts.append('<h2>Findings</h2><table id="findings"><thead><tr><th>severity</th><th>kind</th><th>layer</th>')
    parts.append("<th>since step</th><th>step</th><th>what</th><th>try</th></tr></thead><tbody>")
    suggested = set()
    for f in report.findings:
        advice = esc(f.suggestion) if f.suggestion not in suggested else '<span class="muted">as above</span>'
        suggested.add(f.suggestion)
        cause = f'<br><span class="muted cause">{esc(describe(f.cause))}</span>' if f.cause else ""
        parts.append(
            f'<tr class="finding"><td><span class="status {esc(f.severity)}">{esc(f.severity)}</span></td>'
            f"<td>{esc(f.kind)}</td><td>{esc(f.layer or '')}</td>"
            f'<td class="num">{"" if f.since_step is None else f.since_step}</td><td class="num">{f.step}</td>'
            f"<td>{esc(f.message)}{cause}</td><td>{advice}</td></tr>"
        )
    if not report.findings:
        parts.append('<tr><td colspan="7">No findings: the run looks healthy.</td></tr>')
    parts.append("</tbody></table>")
    if report.actions:  # what gradscope did about them (gradscope.actions)
        parts.append('<h2>Actions taken</h2><table id="actions"><thead><tr><th>step</th><th>action</th>')
        parts.append("<th>what</th></tr></thead><tbody>")
        for action in report.actions:
            parts.append(
                f'<tr class="action"><td class="num">{action["step"]}</td><td>{esc(action["action"])}</td>'
                f"<td>{esc(action['message'])}</td></tr>"
            )
        parts.append("</tbody></table>")
    captions = {
        "gradient_flow": "Gradient flow",
        "zero_fraction": "Exact zeros",
        "norms": "Gradient norms",
        "ridges": "Histogram ridges",
        "loss": "Loss and metrics",
    }
    for panel in ("loss", "gradient_flow", "norms", "zero_fraction", "ridges"):
        encoded = base64.b64encode(png_bytes(figure(data, panel))).decode("ascii")
        parts.append(f"<h2>{captions[panel]}</h2>")
        parts.append(f'<img id="{panel}" alt="{esc(captions[panel])}" src="data:image/png;base64,{encoded}">')
    parts.append('<h2>Layers</h2><table id="layers"><thead><tr><th>layer</th><th>type</th><th>numel</th>')
    parts.append("<th>norm</th><th>rms</th><th>max |g|</th><th>zeros</th><th>NaN/Inf</th><th>update/weight</th>")
    parts.append("<th>FP8 E5M2 flushed</th><th>status</th>")
    parts.append("</tr></thead><tbody>")
    for row in report.layers:
        # A layer holding NaN/Inf shows nan, never the finite elements' numbers alone.
        norm, rms, max_abs = (float("nan"),) * 3 if row.nonfinite else (row.norm, row.rms, row.max_abs)
        parts.append(
            f"<tr><td>{esc(row.name)}</td><td>{esc(row.type)}</td>{_cell(row.numel, 'int')}{_cell(norm)}"
            f"{_cell(rms)}{_cell(max_abs)}{_cell(row.zero_frac, 'pct')}{_cell(row.nonfinite, 'int')}"
            f"{_cell(row.update_ratio)}{_cell(row.fp8_e5m2_zero, 'pct')}<td>{esc(row.status)}</td></tr>"
        )
    parts.append("</tbody></table>")
    if report.compression is not None:
        parts += _compression_table(report.compression)
    parts.append("<h2>Resources</h2><table><tbody>")
    for key, value in report.resources.items():  # units and digits as in the printed report
        parts.append(f"<tr><td>{esc(str(key))}</td><td>{esc(format_resource(str(key), value))}</td></tr>")
    parts.append("</tbody></table></body></html>")
    return "\n".join(parts)


def _compression_table(section) -> list[str]:
    """The report's compression section (``watch(..., compression=True)``) as a table."""
    esc = html.escape
    parts = [
        f'<h2>Compression</h2><p class="muted">Weights at step {section.step}; importance summed over '
        f"{section.readings} readings. Least important first.</p>",
        '<table id="compression"><thead><tr><th>layer</th><th>verdict</th><th>INT8 noise</th>',
        "<th>FP8 E4M3 noise</th><th>Σ|Σ g·w|</th><th>Σ(g·w)²</th><th>why</th></tr></thead><tbody>",
    ]
    by_name = {layer.name: layer for layer in section.layers}
    for name in section.least_important:
        layer = by_name[name]
        noise = {short: figures["noise"] for short, figures in layer.formats.items()}
        verdict = layer.verdict if layer.format is None else f"{layer.verdict} ({layer.format})"
        parts.append(
            f"<tr><td>{esc(name)}</td><td>{esc(verdict or '-')}</td>{_cell(noise.get('int8'))}"
            f"{_cell(noise.get('fp8_e4m3'))}{_cell(layer.saliency)}{_cell(layer.fisher)}<td>{esc(layer.reason)}</td></tr>"
        )
    parts.append("</tbody></table>")
    return parts


def write_html(
    source, path: str | os.PathLike, report: HealthReport | None = None, title: str = "gradscope run"
) -> None:
    """Write :func:`html_report` to ``path``."""
    text = html_report(source, report, title)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
