"""Write a report's files, and read one back (``graphpress report out/`` re-renders from the JSON)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from ..errors import GraphpressError, first_line
from ..fileio import MANIFEST, manifest_entries, publish_all, staging_dir, verify_published, write_manifest
from .data import CompressionReport
from .html import render_html
from .markdown import PLOTS_DIR, render_markdown
from .plots import render_plots


class ReportError(GraphpressError):
    """A report directory or JSON file that cannot be read back."""


def write_report(report: CompressionReport, out_dir: str | Path, *, json_too: bool = True) -> dict[str, Path]:
    """report.json (unless re-rendering from it), report.md, report.html and plots/*.png under ``out_dir``.

    All are written to a staging directory and published together, the figures first and
    the pages last; figures an earlier rendering left in plots/ that this one does not
    draw are removed.
    """
    out = Path(out_dir)
    figures = render_plots(report)
    markdown = render_markdown(report, figures)
    files = {f"plot:{f.name}": (f"{PLOTS_DIR}/{f.name}", f.png) for f in figures}
    if json_too:
        files["report_json"] = ("report.json", report.to_json().encode())
    files["report_md"] = ("report.md", markdown.encode())
    files["report_html"] = ("report.html", render_html(markdown, figures).encode())
    for name, _ in files.values():  # names are built from report data: they must stay where they are put
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ReportError(f"{name!r}: a report file name outside {out}")
    with staging_dir(out) as stage:
        for name, data in files.values():
            (stage / name).parent.mkdir(exist_ok=True)
            (stage / name).write_bytes(data)
        written = {key: out / name for key, (name, _) in files.items()}
        last = list(written.values())
        if not json_too and (out / MANIFEST).exists():  # re-rendered in a run's OUT: its manifest follows
            earlier = {k: v for k, v in manifest_entries(out).items() if not k.startswith(PLOTS_DIR + "/")}
            last.append(write_manifest(out, stage, last, earlier))
        publish_all(stage, out, last=last, mirror=[PLOTS_DIR])
    return written


def load_report(path: str | Path) -> tuple[CompressionReport, Path]:
    """A report from ``path`` (an output directory or its report.json), and the directory it lives in."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise ReportError(f"{path}: no report.json here (give the --out directory of a graphpress compress run)")
    verify_published(file)
    if file.stat().st_size > MAX_REPORT_BYTES:
        raise ReportError(f"{file}: {file.stat().st_size:,} bytes, more than a report ({MAX_REPORT_BYTES:,} at most)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ReportError(f"{file}: not a graphpress report: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{file}: not a graphpress report: a JSON {type(data).__name__}, not an object")
    try:
        return CompressionReport.from_dict(data), file.parent
    except ValidationError as exc:
        problems = [f"{_where(e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise ReportError(f"{file}: not a graphpress report: " + "; ".join(problems) + more) from None


MAX_REPORT_BYTES = 256 * 2**20


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _where(loc: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else str(k)) for i, k in enumerate(loc)) or "$"
