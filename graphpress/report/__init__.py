"""The report: data collected by a run, and its renderings (JSON, Markdown)."""

from .data import CompressionReport
from .markdown import render_markdown

__all__ = ["CompressionReport", "render_markdown"]
