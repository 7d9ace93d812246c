"""Write a report's files, and read one back (``graphpress report out/`` re-renders from the JSON)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import GraphpressError
from ..fileio import atomic_write_bytes, atomic_write_text
from .data import CompressionReport
from .html import render_html
from .markdown import PLOTS_DIR, render_markdown
from .plots import render_plots


class ReportError(GraphpressError):
    """A report directory or JSON file that cannot be read back."""


def write_report(report: CompressionReport, out_dir: str | Path, *, json_too: bool = True) -> dict[str, Path]:
    """report.json (unless re-rendering from it), report.md, report.html and plots/*.png under ``out_dir``.

    Everything is rendered in memory first, then each file is replaced atomically; figures
    a previous rendering left in plots/ that this one no longer draws are removed.
    """
    out = Path(out_dir)
    figures = render_plots(report)
    markdown = render_markdown(report, figures)
    page = render_html(markdown, figures)
    written: dict[str, Path] = {}
    plots = out / PLOTS_DIR
    for figure in figures:
        written[f"plot:{figure.name}"] = atomic_write_bytes(plots / figure.name, figure.png)
    if plots.is_dir():
        for stale in plots.glob("*.png"):
            if f"plot:{stale.name}" not in written:
                stale.unlink()
    if json_too:
        written["report_json"] = atomic_write_text(out / "report.json", report.to_json())
    written["report_md"] = atomic_write_text(out / "report.md", markdown)
    written["report_html"] = atomic_write_text(out / "report.html", page)
    return written


def load_report(path: str | Path) -> tuple[CompressionReport, Path]:
    """A report from ``path`` (an output directory or its report.json), and the directory it lives in."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise ReportError(f"{path}: no report.json here (give the --out directory of a graphpress compress run)")
    try:
        data = json.loads(file.read_text())
        return CompressionReport.from_dict(data), file.parent
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{file}: not a graphpress report: {exc}") from exc
