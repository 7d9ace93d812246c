"""The report: data collected by a run, and its renderings (JSON, Markdown, HTML, figures)."""

from .data import CompressionReport
from .html import render_html
from .markdown import PLOTS_DIR, render_markdown
from .plots import Figure, render_plots
from .writer import load_report, write_report

__all__ = [
    "PLOTS_DIR",
    "CompressionReport",
    "Figure",
    "load_report",
    "render_html",
    "render_markdown",
    "render_plots",
    "write_report",
]
