"""Markdown rendering of a CompressionReport: the summary a person reads first."""

from __future__ import annotations

from .data import CompressionReport
from .plots import Figure

PLOTS_DIR = "plots"
"""Where figures go, relative to the report."""


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _fmt_size(n: int | None) -> str:
    return "" if n is None else _fmt_bytes(n)


def _fmt_num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.2f}"


def _fmt_err(x) -> str:
    return "" if x is None else f"{x:.3g}"


def _fmt_detail(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_fmt_detail(v)}" for k, v in value.items()) + ")"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _detail_columns(layers: list[dict]) -> list[str]:
    """Per-layer details worth a table column: scalars and short tuples (not spectra, not reasons)."""
    columns: list[str] = []
    for layer in layers:
        for key, value in layer["details"].items():
            short = isinstance(value, (int, float, str)) or (isinstance(value, (list, tuple)) and len(value) <= 3)
            if short and key != "reason" and key not in columns:
                columns.append(key)
    return columns


def _fmt_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return _fmt_err(value)
    if isinstance(value, (list, tuple)):
        return " -> ".join(_fmt_cell(v) for v in value)
    return _fmt_detail(value)


def _latency_sentence(latency: dict | None) -> str:
    if not latency:
        return ""
    where = f" on {latency['device']}" if latency.get("device") else ""
    return (
        f" Validation ran {latency['artifact_ms']:.3g} ms per {latency['per']}{where} "
        f"(eager PyTorch {latency['eager_ms']:.3g} ms; not a benchmark)."
    )


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}" if before else "n/a"


def _images(figures: dict[str, Figure], *names: str) -> list[str]:
    return [f"![{figures[n].title}]({PLOTS_DIR}/{n})" for n in names if n in figures] + [""] * any(
        n in figures for n in names
    )


def render_markdown(report: CompressionReport, figures: list[Figure] = ()) -> str:
    """The report as Markdown; ``figures`` (see :func:`render_plots`) are linked from plots/."""
    figures = {f.name: f for f in figures}
    o, c = report.original, report.compressed
    lines = [
        f"# graphpress report: {report.model}",
        "",
        "| | original | compressed | ratio |",
        "|---|---:|---:|---:|",
        f"| parameters | {_fmt_int(o['params'])} | {_fmt_int(c['params'])} | {_ratio(c['params'], o['params'])} |",
        f"| stored bytes | {_fmt_bytes(o['bytes'])} | {_fmt_bytes(c['bytes'])} | {_ratio(c['bytes'], o['bytes'])} |",
        f"| linear FLOPs / token | {_fmt_int(o['linear_flops_per_token'])} | {_fmt_int(c['linear_flops_per_token'])} "
        f"| {_ratio(c['linear_flops_per_token'], o['linear_flops_per_token'])} |",
    ]
    if o.get("kv_cache_bytes_per_token"):
        ok, ck = o["kv_cache_bytes_per_token"], c["kv_cache_bytes_per_token"]
        lines.append(f"| KV-cache bytes / token | {_fmt_num(ok)} | {_fmt_num(ck)} | {_ratio(ck, ok)} |")
        if c.get("kv_cache_window_bytes"):
            lines.append(f"| KV-cache window bytes (fp residual) | 0 | {_fmt_int(c['kv_cache_window_bytes'])} | |")
    lines += [
        "",
        f"Calibration: {report.calibration.get('samples', '?')} batches ({report.calibration.get('source', '?')}), "
        f"seed {report.calibration.get('seed', '?')}.",
        *_capture_line(report.capture),
        "",
        *_images(figures, "verification.png", "kv-cache.png"),
    ]
    for i, p in enumerate(report.passes):
        lines += [f"## passes[{i}]: {p['name']}", ""]
        v = p.get("verification")
        if v:
            verdict = "passed" if v["passed"] else "FAILED"
            lines.append(
                f"Verification vs original ({verdict}): {v['metric']} = {v[v['metric']]:.4g} (max {v['max']:g}); "
                f"rel_l2 {v['rel_l2']:.4g}, max_abs {v['max_abs']:.4g}, cosine distance {v['cosine_distance']:.3g}."
            )
        if p.get("details"):
            lines.append("Details: " + "; ".join(f"{k} {_fmt_detail(v)}" for k, v in p["details"].items()) + ".")
        columns = _detail_columns(p["layers"])
        lines += [
            f"Parameters {_fmt_int(p['params_before'])} -> {_fmt_int(p['params_after'])}; time {p['seconds']:.2f} s.",
            "",
            "| layer | action | params before | params after | bytes before | bytes after |"
            + "".join(f" {c.replace('_', ' ')} |" for c in columns),
            "|---|---|---:|---:|---:|---:|" + "---:|" * len(columns),
        ]
        for layer in p["layers"]:
            d = layer["details"]
            cells = "".join(f" {_fmt_cell(d.get(c))} |" for c in columns)
            lines.append(
                f"| `{layer['path']}` | {layer['action']} | {_fmt_int(layer['params_before'])} "
                f"| {_fmt_int(layer['params_after'])} | {_fmt_size(layer.get('bytes_before'))} "
                f"| {_fmt_size(layer.get('bytes_after'))} |{cells}"
            )
        skipped = [layer for layer in p["layers"] if layer["action"] == "skipped"]
        if skipped:
            lines += ["", f"Skipped {len(skipped)} layer(s): {skipped[0]['details'].get('reason', '')} (first shown)."]
        lines.append("")
        lines += _images(figures, f"passes-{i}-{p['name']}.png", f"passes-{i}-spectra.png")
    if report.backends:
        lines += _images(figures, "latency.png")
    for b in report.backends:
        files = ", ".join(f"`{name}` ({_fmt_bytes(size)})" for name, size in b["files"].items())
        top_ops = ", ".join(f"{op} x{n}" for op, n in list(b["op_histogram"].items())[:8])
        lines += [
            f"## backend: {b['target']}",
            "",
            f"Files: {files}.",
            f"Parity with eager on calibration inputs: rel_l2 {b['errors']['rel_l2']:.3g}, "
            f"max_abs {b['errors']['max_abs']:.3g} (tolerance rel_l2 <= {b['tolerance']:g}).",
            f"Ops: {top_ops}.",
            f"Time {b['seconds']:.2f} s." + _latency_sentence(b.get("latency")),
            "",
        ]
    if report.warnings:
        lines += ["## warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items())
    lines += [f"Timings: {timing}.", ""]
    return "\n".join(lines)


def _capture_line(capture: dict) -> list[str]:
    """'Captured: decode mode, float32; input_ids 1+ x 1, ...': the shapes the artifacts accept."""
    if not capture:
        return []

    def dim(d) -> str:
        if isinstance(d, int):
            return str(d)
        low, high = max(int(d[0]), 1), d[1]
        return f"{low}+" if high is None else f"{low}..{high}"

    inputs = ", ".join(f"{name} {' x '.join(map(dim, dims))}" for name, dims in capture.get("inputs", {}).items())
    return ["", f"Captured: {capture.get('mode', '?')} mode, {capture.get('dtype', '?')}; inputs {inputs or 'none'}."]
