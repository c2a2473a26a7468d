"""The files of a finished run's reports: the health report as text, the visual report as
HTML and/or PNG (the visual report needs matplotlib, the ``viz`` extra)."""

from __future__ import annotations

from pathlib import Path

from gradscope.health.report import HealthReport


def visual_available() -> bool:
    """Whether the visual report can be drawn here (matplotlib is installed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_visual(source, report: HealthReport, html: Path | None, png: Path | None, title: str) -> list[Path]:
    """Write the visual report of ``source`` (a monitor or a run read back) as HTML and/or
    PNG; returns the files written."""
    from gradscope.outputs import html_page, visual

    written = []
    if html is not None:
        html_page.write_html(source, html, report=report, title=title)
        written.append(html)
    if png is not None:
        visual.write_png(source, png, report=report)
        written.append(png)
    return written


def write_reports(source, report: HealthReport, directory: Path, title: str) -> list[Path]:
    """``report.txt`` (the health report as printed) and, where matplotlib is installed,
    ``report.html`` (the visual report) in ``directory``; returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "report.txt"
    text.write_text(str(report) + "\n", encoding="utf-8")
    written = [text]
    if visual_available():
        written += write_visual(source, report, directory / "report.html", None, title)
    return written
