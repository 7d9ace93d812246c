"""The report's figures, drawn with matplotlib from the report's data alone.

Each figure is a PNG (the format Markdown viewers and browsers all show) rendered
without timestamps or software tags, so the same report gives the same bytes. A figure
is drawn only when the report has its data: spectra only for low_rank, KV bytes only
for decode graphs, latency only when a backend measured it.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

from .data import CompressionReport

ERROR_KEYS = ("weight_error", "output_error", "attention_error")
"""Per-layer errors passes record in their layer details (relative, lower is better)."""
MAX_ROWS = 60
"""Layers drawn per figure at most (the largest by stored bytes); the tables list every layer."""
MAX_LINES = 24
"""Spectra drawn at most."""


def layers_figure(index: int, pass_name: str) -> str:
    """The per-layer figure's file name: the pass name reduced to a safe slug (it comes from report data)."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "-", pass_name).strip("-")[:48] or "pass"
    return f"passes-{index}-{slug}.png"


def _number(value) -> float:
    """A figure from report data as a float for plotting (anything else, or non-finite: 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else 0.0


@dataclass(frozen=True)
class Figure:
    name: str
    """File name under plots/, e.g. 'passes-0-low_rank.png'."""
    title: str
    png: bytes


def render_plots(report: CompressionReport) -> list[Figure]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):  # names are data, not TeX
        figures = [_evaluation(report), _verification(report), _kv_cache(report), _latency(report)]
        for i, p in enumerate(report.passes):
            figures += [_layers(i, p), _spectra(i, p), _loss_curve(i, p)]
    return [f for f in figures if f is not None]


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _figure(width: float, height: float, panels: int = 1):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width, height), squeeze=False, layout="constrained")
    return fig, list(axes[0])


def _legend(ax, entries: int) -> None:
    """The legend above the axes, never over the bars (a figure's panels each keep theirs)."""
    ax.legend(
        fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=min(entries, 3), frameon=False, borderaxespad=0
    )


def _plain_numbers(axis) -> None:
    """Tick labels as plain numbers (1, 0.01, 1e-05): mathtext is off, so matplotlib's log labels would print raw."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def _label_bars(ax, bars, form: str = "{:.3g}", fontsize: int = 7) -> None:
    """Each horizontal bar's value written just past its end."""
    for bar in bars:
        width = bar.get_width()
        ax.annotate(
            " " + form.format(width), (width, bar.get_y() + bar.get_height() / 2), va="center", fontsize=fontsize
        )


def _short(path: str) -> str:
    path = path.removeprefix("model.")
    return path if len(path) <= 60 else "..." + path[-57:]


def _layers(index: int, p: dict) -> Figure | None:
    """Per layer: stored bytes before/after, and the errors the pass measured."""
    shown = sorted(p["layers"], key=lambda layer: -(layer.get("bytes_before") or 0))[:MAX_ROWS]
    shown = [layer for layer in p["layers"] if any(layer is s for s in shown)]  # in the pass's order
    layers = [layer for layer in shown if layer.get("bytes_before") or layer.get("bytes_after")]
    errors = [k for k in ERROR_KEYS if any(isinstance(layer["details"].get(k), float) for layer in shown)]
    if not layers and not errors:
        return None
    rows = max(len(layers), len(shown) if errors else 0)
    fig, axes = _figure(11 if errors and layers else 6, 0.9 + 0.28 * rows, 2 if errors and layers else 1)
    if layers:
        ax = axes[0]
        names = [_short(layer["path"]) for layer in layers]
        ys = range(len(layers))
        before = [_number(layer.get("bytes_before")) / 1024 for layer in layers]
        ax.barh([y + 0.2 for y in ys], before, 0.4, label="before")
        ax.barh(
            [y - 0.2 for y in ys], [_number(layer.get("bytes_after")) / 1024 for layer in layers], 0.4, label="after"
        )
        ax.set_yticks(list(ys), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("stored KiB")
        ax.set_title("bytes per layer", pad=16)
        _legend(ax, 2)
    if errors:
        ax = axes[-1]
        names = [_short(layer["path"]) for layer in shown]
        width = 0.8 / len(errors)
        for k, key in enumerate(errors):
            values = [_number(layer["details"].get(key)) for layer in shown]
            ax.barh(
                [y - 0.4 + width * (k + 0.5) for y in range(len(names))], values, width, label=key.replace("_", " ")
            )
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("relative error")
        ax.set_title("error per layer", pad=16)
        _legend(ax, len(errors))
    some = f" ({len(shown)} largest of {len(p['layers'])} layers)" if len(shown) < len(p["layers"]) else ""
    fig.suptitle(f"passes[{index}] {p['name']}{some}")
    return Figure(
        layers_figure(index, p["name"]), f"passes[{index}] {p['name']}: bytes and error per layer{some}", _png(fig)
    )


def _spectra(index: int, p: dict) -> Figure | None:
    """low_rank: each layer's singular spectrum (normalised to its largest value) and the rank kept."""
    layers = [layer for layer in p["layers"] if isinstance(layer["details"].get("spectrum"), list)]
    layers = [layer for layer in layers if layer["details"]["spectrum"]][:MAX_LINES]
    if not layers:
        return None
    fig, (ax,) = _figure(7, 4)
    for layer in layers:
        spectrum = [_number(s) for s in layer["details"]["spectrum"][:4096]]
        top = spectrum[0] or 1.0
        values = [max(s / top, 1e-12) for s in spectrum]
        (line,) = ax.semilogy(range(1, len(values) + 1), values, linewidth=1, label=_short(layer["path"]))
        rank = layer["details"].get("rank")
        if isinstance(rank, int) and 0 < rank <= len(values):
            ax.plot([rank], [values[rank - 1]], "o", color=line.get_color(), markersize=4)
    ax.set_xlabel("index (dots: rank kept)")
    ax.set_ylabel("σ_i / σ_1")
    _plain_numbers(ax.yaxis)
    ax.set_title(f"passes[{index}] low_rank: singular spectra of the scaled weights")
    if len(layers) <= 12:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return Figure(f"passes-{index}-spectra.png", f"passes[{index}] low_rank: singular spectra", _png(fig))


def _loss_curve(index: int, p: dict) -> Figure | None:
    """distill: the training loss over the steps, and the KL on the data before and after (the verification figure
    has the error vs the original before the pass and after it)."""
    curve = p.get("details", {}).get("loss_curve")
    if not isinstance(curve, list) or not curve:
        return None
    steps = _number(p["details"].get("steps")) or len(curve)
    fig, (ax,) = _figure(6, 3.2)
    xs = [steps * (i + 0.5) / len(curve) for i in range(len(curve))]
    ax.plot(xs, [_number(v) for v in curve], linewidth=1.2, label="training loss (KL, mean per point)")
    for key, style in (("kl_before", "--"), ("kl_after", ":")):
        ax.axhline(_number(p["details"].get(key)), color="gray", linestyle=style, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student)")
    _legend(ax, 3)
    return Figure(f"passes-{index}-loss.png", f"passes[{index}] distill: loss curve", _png(fig))


def _verification(report: CompressionReport) -> Figure | None:
    """The pipeline's error vs the original after each pass, against the spec's threshold."""
    checked = [(i, p) for i, p in enumerate(report.passes) if p.get("verification")][:MAX_ROWS]
    if not checked:
        return None
    metric = checked[0][1]["verification"]["metric"]
    fig, (ax,) = _figure(6, 0.9 + 0.35 * len(checked))
    names = [f"passes[{i}] {p['name']}" for i, p in checked]
    bars = ax.barh(range(len(names)), [_number(p["verification"].get(metric)) for _, p in checked], 0.6)
    _label_bars(ax, bars)
    ax.axvline(checked[0][1]["verification"]["max"], color="red", linestyle="--", label="verify.max")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.15)
    ax.set_xlabel(f"{metric} vs the original (whole pipeline so far)")
    _legend(ax, 1)
    return Figure("verification.png", "error vs the original after each pass", _png(fig))


def _kv_cache(report: CompressionReport) -> Figure | None:
    before, after = report.original.get("kv_cache_bytes_per_token"), report.compressed.get("kv_cache_bytes_per_token")
    if not before:
        return None
    fig, (ax,) = _figure(5, 2.2)
    before, after = _number(before), _number(after)
    bars = ax.barh([0, 1], [before, after], 0.6, color=["tab:blue", "tab:orange"])
    ax.set_yticks([0, 1], ["original", "compressed"])
    ax.invert_yaxis()
    _label_bars(ax, bars, "{:,.0f} B", fontsize=8)
    ax.set_xlabel("KV-cache bytes per token (all layers)")
    return Figure("kv-cache.png", "KV-cache bytes per token", _png(fig))


def _latency(report: CompressionReport) -> Figure | None:
    timed = [(i, b) for i, b in enumerate(report.backends) if b.get("latency")][:MAX_ROWS]
    if not timed:
        return None
    fig, (ax,) = _figure(6, 1.1 + 0.5 * len(timed))
    names = [f"backends[{i}] {b['target']}" for i, b in timed]
    ys = range(len(timed))
    for offset, key, label in ((-0.2, "artifact_ms", "artifact"), (0.2, "eager_ms", "eager PyTorch")):
        values = [max(_number(b["latency"][key]), 1e-3) for _, b in timed]
        _label_bars(ax, ax.barh([y + offset for y in ys], values, 0.4, label=label), "{:.3g} ms")
    ax.set_xscale("log")  # runtimes differ by orders of magnitude: a linear axis hides the fast one
    _plain_numbers(ax.xaxis)
    ax.margins(x=0.2)
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    per = {b["latency"]["per"] for _, b in timed}
    ax.set_xlabel(f"ms per {' / '.join(sorted(per))} during validation, log scale (not a benchmark)")
    _legend(ax, 2)
    return Figure("latency.png", "run time per backend, artifact vs eager", _png(fig))


def _evaluation(report: CompressionReport) -> Figure | None:
    """The evaluation's perplexity against the bytes each model stores: the trade-off the run made."""
    scored = report.evaluation.get("perplexity") if isinstance(report.evaluation, dict) else None
    rows = [r for r in (scored or {}).get("rows", []) if isinstance(r.get("perplexity"), float)][:MAX_ROWS]
    if not rows:
        return None
    fig, (ax,) = _figure(6, 3.2)
    for k, row in enumerate(rows):
        x, y = _number(row.get("bytes")) / 2**20, _number(row["perplexity"])
        ax.plot([x], [y], "o", color=f"C{k % 10}", label=f"{row['model']} ({row['runs_in']}): {y:.4f}")
    ax.set_xlabel("stored MiB")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_xlim(left=0)
    ax.margins(y=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_title(f"perplexity on {scored['tokens']:,} held-out tokens vs stored bytes", fontsize=9)
    return Figure("evaluation.png", "perplexity vs stored bytes", _png(fig))
