"""The command line: ``graphpress compress | report | schema | inspect``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import warnings

from .errors import GraphpressError


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="graphpress", description="Compile-style compression of PyTorch models.")
    parser.add_argument("--version", action="version", version=f"graphpress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    comp = sub.add_parser("compress", help="compress a model as a JSON spec says; write artifacts and a report")
    comp.add_argument("--model", required=True, help="a model directory (e.g. examples/tiny_llama) or 'module:factory'")
    chosen = comp.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--spec", help="path to the JSON spec")
    chosen.add_argument("--preset", help="a named spec shipped with graphpress (see `graphpress presets`)")
    comp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override one field of the spec or preset, e.g. --set passes[0].bits=3 (VALUE is read as JSON, else "
        "as a string); repeatable; checked by the schema like the spec",
    )
    comp.add_argument("--out", required=True, help="output directory for artifacts and report")
    shown = comp.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="print nothing but errors (no progress bars, no summary)")
    shown.add_argument(
        "--progress", action="store_true", help="show progress bars even when stderr is not a terminal (CI logs)"
    )

    rep = sub.add_parser("report", help="re-render report.md, report.html and plots/ from an output's report.json")
    rep.add_argument("out", help="the --out directory of a compress run (or its report.json)")

    sub.add_parser("schema", help="print the spec's JSON Schema (for editors)")

    pre = sub.add_parser("presets", help="list the shipped specs for common goals, or print one as JSON")
    pre.add_argument("name", nargs="?", help="print this preset's spec (to copy and edit)")

    insp = sub.add_parser("inspect", help="summarise an ONNX artifact: sizes, ops, custom domains, KV-cache I/O")
    insp.add_argument("file", help="path to a .onnx file")
    insp.add_argument("--json", action="store_true", help="print the summary as JSON")

    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.command == "schema":
            from .schema import json_schema

            print(json.dumps(json_schema(), indent=2))
            return 0
        if args.command == "presets":
            print(_presets(args.name))
            return 0
        if args.command == "inspect":
            from .inspection import format_inspection, inspect_onnx

            info = inspect_onnx(args.file)
            print(json.dumps(info, indent=2) if args.json else format_inspection(info))
            return 0
        if args.command == "report":
            from .report import load_report, write_report

            report, out = load_report(args.out)
            written = write_report(report, out, json_too=False)
            figures = sum(name.startswith("plot:") for name in written)
            print(f"{written['report_html']}\n{written['report_md']}\n{figures} figure(s) in {out / 'plots'}")
            return 0
        return _compress(args)
    except GraphpressError as exc:
        print(f"graphpress: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`graphpress inspect --json | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot raise again
        return 0


def _terminated(signum, _frame):
    """SIGTERM: remove this run's staging directories and lock (nothing half-written stays), then exit."""
    from .fileio import clean_up_now

    clean_up_now()
    print("graphpress: terminated; no file of this run was published", file=sys.stderr)
    os._exit(128 + signum)


def _compress(args) -> int:
    from .api import compress

    spec = _spec(args)  # fail on a bad spec before loading the model
    if args.quiet:  # the library's and its dependencies' warnings too: the report keeps graphpress's own
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
    progress = False if args.quiet else (True if args.progress else None)
    shown = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        result = compress(args.model, spec, out_dir=args.out, progress=progress)
    finally:
        warnings.formatwarning = shown
    if not args.quiet:
        r = result.report
        print(headline(r))
        verified = r.calibration.get("verification")
        if verified:
            print(f"  verified on {verified['samples']} batches: {verified['source']}")
        for i, p in enumerate(r.passes):
            v = p["verification"] or {}
            print(
                f"  passes[{i}] {p['name']}: {v.get('metric')} {v.get(v.get('metric'), float('nan')):.4g} vs original"
            )
        for b in r.backends:
            print(f"  {b['target']}: {b['artifact']} (rel_l2 vs eager {b['errors']['rel_l2']:.3g})")
        scored = r.evaluation.get("perplexity")
        if scored:
            rows = ", ".join(f"{row['model']} {_figure(row.get('perplexity'))}" for row in scored["rows"])
            print(f"  perplexity on {scored['tokens']:,} tokens of {scored['data']}: {rows}")
        for task, metric in _task_metrics(r.evaluation):
            rows = ", ".join(
                f"{row['model']} {_figure((row.get('tasks') or {}).get(task, {}).get(metric))}"
                for row in r.evaluation["lm_eval"]["rows"]
            )
            print(f"  lm-eval {task} {metric}: {rows}")
        print(f"  report: {result.artifacts['report_html']} ({result.artifacts['report_md'].name}, plots/)")
    return 0


def _one_line_warning(message, category, *_) -> str:
    """A warning as one line, without the source line Python would quote (the user did not write it)."""
    return f"graphpress: {category.__name__}: {message}\n"


def _spec(args):
    from .presets import preset, with_overrides
    from .schema import load_spec

    if args.preset is not None:
        return load_spec(preset(args.preset, args.set))
    spec = load_spec(args.spec)
    if not args.set:
        return spec
    return load_spec(with_overrides(spec.model_dump(mode="json", by_alias=True), args.set))


def _presets(name: str | None) -> str:
    import textwrap

    from .presets import names, preset

    if name is not None:
        return json.dumps(preset(name), indent=2)
    lines = []
    for each in names():
        data = preset(each)
        passes = " + ".join(p["pass"] for p in data.get("passes", []))
        targets = ", ".join(b.get("runtime", b["target"]) for b in data.get("backends", []))
        lines.append(f"{each}  ({passes} -> {targets})")
        lines += textwrap.wrap(data.get("description", ""), 100, initial_indent="    ", subsequent_indent="    ")
    lines.append("\nrun one: graphpress compress --model DIR --preset NAME --out OUT [--set passes[0].bits=3 ...]")
    return "\n".join(lines)


def headline(report) -> str:
    """What the run saved: stored bytes first (every tensor the model keeps), the KV cache per token for decode
    graphs, parameters only where they still measure the weights (no compressed format holds them as buffers)."""
    o, c = report.original, report.compressed
    parts = [f"stored {_megabytes(o['bytes'])} -> {_megabytes(c['bytes'])} ({c['bytes'] / o['bytes']:.3f}x)"]
    if o.get("kv_cache_bytes_per_token"):
        ok, ck = o["kv_cache_bytes_per_token"], c["kv_cache_bytes_per_token"]
        parts.append(f"KV cache {ok:,.0f} -> {ck:,.0f} bytes/token ({ck / ok:.3f}x)")
    if not c.get("format_bytes"):
        parts.append(f"parameters {o['params']:,} -> {c['params']:,} ({c['params'] / o['params']:.3f}x)")
    rows = report.evaluation.get("perplexity", {}).get("rows", [])
    if len(rows) >= 2 and rows[0].get("perplexity") and rows[1].get("perplexity") is not None:
        before, after = rows[0]["perplexity"], rows[1]["perplexity"]
        parts.append(f"perplexity {before:.4f} -> {after:.4f} ({after / before - 1:+.1%})")
    elif tasks := _task_metrics(report.evaluation):  # no perplexity: the first task metric leads instead
        task, metric = tasks[0]
        before, after = (row["tasks"][task][metric] for row in report.evaluation["lm_eval"]["rows"][:2])
        parts.append(f"{task} {metric} {before:.4f} -> {after:.4f}")
    return f"{report.model}: " + ", ".join(parts)


def _task_metrics(evaluation: dict) -> list[tuple[str, str]]:
    """(task, metric) pairs the original was scored on by lm-eval, in its order."""
    rows = evaluation.get("lm_eval", {}).get("rows", [])
    return (
        [(task, metric) for task, metrics in (rows[0].get("tasks") or {}).items() for metric in metrics] if rows else []
    )


def _figure(value: float | None) -> str:
    return "failed" if value is None else f"{value:.4f}"


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


if __name__ == "__main__":
    sys.exit(main())
