"""Markdown rendering of a CompressionReport: the summary a person reads first.

Every string that comes from the report's data (model name, module paths, pass names,
warnings, details) is rendered inert with :func:`text` or :func:`code`: one line, with
every character Markdown or HTML could act on escaped, so a crafted report.json cannot
add headings, table cells, tags or links. The only links are the figures graphpress drew.
"""

from __future__ import annotations

import re

from .data import CompressionReport
from .plots import Figure, layers_figure

_ACTIVE = re.compile(r"([\\`*_{}\[\]()<>#!|~&])")
_LEADING = re.compile(r"^([-+=:>]|\d+[.)])")  # what would start a list, quote or heading rule at a line's start
_URL = re.compile(r"(?i)(://|www\.|@)")


def _one_line(value) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in str(value)).split())


def text(value, leading: bool = True) -> str:
    """Report data as plain Markdown text: one line, active characters backslash-escaped, no autolinks.

    ``leading``: the text may start a line, so a list marker or quote there is escaped too.
    """
    escaped = _ACTIVE.sub(r"\\\1", _one_line(value))
    if leading:
        escaped = _LEADING.sub(lambda m: m[1][:-1] + "\\" + m[1][-1], escaped)
    return _URL.sub(lambda m: "".join(c if c.isalnum() else "\\" + c for c in m[1]), escaped)


def code(value) -> str:
    """Report data as an inline code span (backticks become quotes; a table's pipe stays escaped)."""
    return "`" + _one_line(value).replace("`", "'").replace("|", "\\|") + "`"


def prose(value) -> str:
    """A message with `quoted` parts (graphpress's warnings): the quoted parts as code, the rest as text."""
    parts = _one_line(value).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans
        return text(value)
    return "".join(code(part) if k % 2 else text(part, leading=k == 0) for k, part in enumerate(parts))


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


def _g(x, digits: int = 4) -> str:
    """A measured figure, or n/a where the report holds none (a non-finite value is written as null)."""
    return "n/a" if x is None else f"{x:.{digits}g}"


def _fmt_detail(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{text(k)} {_fmt_detail(v)}" for k, v in value.items()) + ")"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt_detail(v) for v in value[:8]) + (", ..." if len(value) > 8 else "") + ")"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else prose(value)


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
        return " -> ".join(_fmt_cell(v) for v in value[:3])
    return _fmt_detail(value)


def _latency_sentence(latency: dict | None) -> str:
    if not latency:
        return ""
    where = f" on {text(latency['device'])}" if latency.get("device") else ""
    return (
        f" Validation ran {latency['artifact_ms']:.3g} ms per {text(latency['per'])}{where} "
        f"(eager PyTorch {latency['eager_ms']:.3g} ms; not a benchmark)."
    )


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}" if before else "n/a"


def _images(figures: dict[str, Figure], *names: str) -> list[str]:
    return [f"![{text(figures[n].title)}]({PLOTS_DIR}/{n})" for n in names if n in figures] + [""] * any(
        n in figures for n in names
    )


def _verification_line(verification) -> list[str]:
    """Which inputs each pass was verified on (reports written before this was recorded have none)."""
    if not isinstance(verification, dict):
        return []
    return [f"Verified on {text(verification.get('samples', '?'))} batches: {text(verification.get('source', '?'))}."]


def render_markdown(report: CompressionReport, figures: list[Figure] = ()) -> str:
    """The report as Markdown; ``figures`` (see :func:`render_plots`) are linked from plots/."""
    figures = {f.name: f for f in figures}
    o, c = report.original, report.compressed
    description = report.spec.get("description") if isinstance(report.spec, dict) else None
    lines = [f"# graphpress report: {text(report.model)}", ""]
    if description:
        lines += [text(description), ""]
    if report.warnings:  # first: what the reader must know before trusting the figures below
        lines += ["## warnings", ""] + [f"- {prose(w)}" for w in report.warnings] + [""]
    lines += [
        "| | original | compressed | ratio |",
        "|---|---:|---:|---:|",
        f"| stored bytes | {_fmt_bytes(o['bytes'])} | {_fmt_bytes(c['bytes'])} | {_ratio(c['bytes'], o['bytes'])} |",
        f"| parameters{' (compressed weights are format buffers: see stored bytes)' if c.get('format_bytes') else ''} "
        f"| {_fmt_int(o['params'])} | {_fmt_int(c['params'])} | {_ratio(c['params'], o['params'])} |",
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
        f"Calibration: {text(report.calibration.get('samples', '?'))} batches "
        f"({text(report.calibration.get('source', '?'))}), seed {text(report.calibration.get('seed', '?'))}.",
        *_verification_line(report.calibration.get("verification")),
        *_capture_line(report.capture),
        "",
        *_evaluation(report.evaluation, figures),
        *_images(figures, "verification.png", "kv-cache.png"),
    ]
    for i, p in enumerate(report.passes):
        lines += [f"## passes[{i}]: {text(p['name'])}", ""]
        v = p.get("verification")
        if v:
            verdict = "passed" if v["passed"] else "FAILED"
            lines.append(
                f"Verification vs original ({verdict}): {v['metric']} = {_g(v.get(v['metric']))} (max {v['max']:g}); "
                f"rel_l2 {_g(v.get('rel_l2'))}, max_abs {_g(v.get('max_abs'))}, "
                f"cosine distance {_g(v.get('cosine_distance'), 3)}."
            )
        if p.get("details"):
            lines.append("Details: " + "; ".join(f"{text(k)} {_fmt_detail(v)}" for k, v in p["details"].items()) + ".")
        columns = _detail_columns(p["layers"])
        lines += [
            f"Parameters {_fmt_int(p['params_before'])} -> {_fmt_int(p['params_after'])}; time {p['seconds']:.2f} s.",
            "",
            "| layer | action | params before | params after | bytes before | bytes after |"
            + "".join(f" {text(c.replace('_', ' '))} |" for c in columns),
            "|---|---|---:|---:|---:|---:|" + "---:|" * len(columns),
        ]
        for layer in p["layers"]:
            d = layer["details"]
            cells = "".join(f" {_fmt_cell(d.get(c))} |" for c in columns)
            lines.append(
                f"| {code(layer['path'])} | {text(layer['action'])} | {_fmt_int(layer['params_before'])} "
                f"| {_fmt_int(layer['params_after'])} | {_fmt_size(layer.get('bytes_before'))} "
                f"| {_fmt_size(layer.get('bytes_after'))} |{cells}"
            )
        skipped = [layer for layer in p["layers"] if layer["action"] == "skipped"]
        if skipped:
            reason = prose(skipped[0]["details"].get("reason", ""))
            lines += ["", f"Skipped {len(skipped)} layer(s): {reason} (first shown)."]
        lines.append("")
        lines += _images(figures, layers_figure(i, p["name"]), f"passes-{i}-spectra.png", f"passes-{i}-loss.png")
    if report.backends:
        lines += _images(figures, "latency.png")
    for b in report.backends:
        files = ", ".join(f"{code(name)} ({_fmt_bytes(size)})" for name, size in b["files"].items())
        top_ops = ", ".join(f"{text(op)} x{n}" for op, n in list(b["op_histogram"].items())[:8])
        lines += [
            f"## backend: {text(b['target'])}",
            "",
            f"Files: {files}.",
            f"Parity with eager on calibration inputs: rel_l2 {_g(b['errors'].get('rel_l2'), 3)}, "
            f"max_abs {_g(b['errors'].get('max_abs'), 3)} (tolerance rel_l2 <= {b['tolerance']:g}).",
            *_shapes_line(b.get("details", {}).get("validated_shapes")),
            *([f"Ops: {top_ops}."] if top_ops else []),  # a checkpoint (hf) has weights, not ops
            f"Time {b['seconds']:.2f} s." + _latency_sentence(b.get("latency")),
            "",
        ]
    timing = ", ".join(f"{text(k)} {v:.2f} s" for k, v in report.timings.items())
    lines += [f"Timings: {timing}.", ""]
    return "\n".join(lines)


def _shapes_line(shapes) -> list[str]:
    """The input shapes a backend validated its artifact at (the calibration's and a second one)."""
    if not isinstance(shapes, list) or not shapes:
        return []
    return [f"Validated at input shapes: {', '.join(text(s) for s in shapes[:8])}."]


def _evaluation(evaluation: dict, figures: dict[str, Figure]) -> list[str]:
    """The spec's evaluate results: perplexity of the original, the compressed graph and each artifact."""
    if not isinstance(evaluation, dict) or not evaluation:
        return []
    lines = [
        "## evaluation",
        "",
        *_perplexity(evaluation.get("perplexity"), figures),
        *_lm_eval(evaluation.get("lm_eval")),
    ]
    return lines


def _lm_eval(scored) -> list[str]:
    """lm-evaluation-harness metrics per model and task, each beside the original's."""
    if not scored:
        return []
    limit = f", at most {_fmt_int(scored['limit'])} documents each" if scored.get("limit") else ""
    lines = [
        f"lm-evaluation-harness: {', '.join(code(t) for t in scored['tasks'])}{limit}.",
        "",
        "| model | runs in | task | metric | value | original |",
        "|---|---|---|---|---:|---:|",
    ]
    reference = scored["rows"][0].get("tasks") or {} if scored["rows"] else {}
    for row in scored["rows"]:
        if row.get("error"):
            lines.append(f"| {text(row['model'])} | {text(row['runs_in'])} | | | failed: {prose(row['error'])} | |")
        for task, metrics in (row.get("tasks") or {}).items():
            for metric, value in metrics.items():
                before = reference.get(task, {}).get(metric)
                lines.append(
                    f"| {text(row['model'])} | {text(row['runs_in'])} | {code(task)} | {text(metric)} | {value:.4f} "
                    f"| {'' if before is None else f'{before:.4f}'} |"
                )
    return [*lines, ""]


def _perplexity(scored, figures: dict[str, Figure]) -> list[str]:
    if not scored:
        return []
    decode = "; decode graphs token by token" if scored.get("decode") == "token_by_token" else ""
    lines = [
        f"Perplexity on {_fmt_int(scored['tokens'])} tokens of {code(scored['data'])} "
        f"(windows of {_fmt_int(scored['seq_len'])}, each scored on its own{decode}).",
        "",
        "| model | runs in | stored bytes | perplexity | vs original |",
        "|---|---|---:|---:|---:|",
    ]
    reference = scored["rows"][0].get("perplexity") if scored["rows"] else None
    for row in scored["rows"]:
        value = row.get("perplexity")
        change = f"{value / reference - 1:+.2%}" if value is not None and reference else ""
        shown = f"{value:.4f}" if value is not None else f"failed: {prose(row.get('error') or '?')}"
        lines.append(
            f"| {text(row['model'])} | {text(row['runs_in'])} | {_fmt_size(row.get('bytes'))} | {shown} | {change} |"
        )
    return [*lines, "", *_images(figures, "evaluation.png")]


def _capture_line(capture: dict) -> list[str]:
    """'Captured: decode mode, float32; input_ids 1+ x 1, ...': the shapes the artifacts accept."""
    if not capture:
        return []

    def dim(d) -> str:
        if isinstance(d, int):
            return str(d)
        if isinstance(d, (list, tuple)) and len(d) == 2 and isinstance(d[0], int):
            low, high = max(d[0], 1), d[1]
            return f"{low}+" if high is None else f"{low}..{text(high)}"
        return text(d)

    shapes = capture.get("inputs", {})
    inputs = ", ".join(
        f"{text(name)} {' x '.join(map(dim, dims)) if isinstance(dims, list) else text(dims)}"
        for name, dims in (shapes.items() if isinstance(shapes, dict) else ())
    )
    mode, dtype = text(capture.get("mode", "?")), text(capture.get("dtype", "?"))
    streamed = (
        " Weights streamed from the checkpoint, layer by layer (execution.stream)."
        if capture.get("streamed") is True
        else ""
    )
    return ["", f"Captured: {mode} mode, {dtype}; inputs {inputs or 'none'}.{streamed}"]
