"""The report a person reads: HTML (one file, figures inlined), Markdown with plots/, progress, re-rendering."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from graphpress.cli import main
from graphpress.progress import Progress, step, track
from graphpress.report import (
    CompressionReport,
    load_report,
    render_html,
    render_markdown,
    render_plots,
    write_report,
)
from graphpress.report.writer import ReportError

PNG = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Checker(HTMLParser):
    """Checks that every element is closed in order and collects <img> sources."""

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.images: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()


def check_html(text: str) -> _Checker:
    assert text.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.open == [], f"unclosed: {checker.open}"
    return checker


def check_report_dir(out: Path) -> _Checker:
    """report.html is valid and self-contained; each figure it shows is also a non-empty PNG under plots/."""
    checker = check_html((out / "report.html").read_text())
    assert {"table", "h1", "h2", "figure"} <= checker.tags
    plots = sorted((out / "plots").glob("*.png"))
    assert plots and all(p.stat().st_size > 1000 and p.read_bytes().startswith(PNG) for p in plots)
    assert len(checker.images) == len(plots)
    inlined = sorted(base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in checker.images)
    assert all(src.startswith("data:image/png;base64,") for src in checker.images)
    assert inlined == sorted(p.read_bytes() for p in plots)  # the HTML needs no other file
    markdown = (out / "report.md").read_text()
    assert all(f"](plots/{p.name})" in markdown for p in plots)
    return checker


def test_render_html_before_expected():
    markdown = "\n".join(
        [
            "# graphpress report: m",
            "",
            "| | a | b |",
            "|---|---:|---:|",
            "| `x<y>` | 1 | 2 |",
            "",
            "One line",
            "and the next.",
            "- item `k`",
            "![a [bracketed] title](plots/f.png)",
        ]
    )
    expected = (
        "<h1>graphpress report: m</h1>\n"
        "<table>\n<thead><tr><th></th><th class=num>a</th><th class=num>b</th></tr></thead>\n<tbody>\n"
        "<tr><td><code>x&lt;y&gt;</code></td><td class=num>1</td><td class=num>2</td></tr>\n</tbody>\n</table>\n"
        "<p>One line and the next.</p>\n"
        "<ul><li>item <code>k</code></li></ul>\n"
        '<figure><img src="plots/f.png" alt="a [bracketed] title"><figcaption>a [bracketed] title</figcaption></figure>'
    )
    page = render_html(markdown)
    body = page.split("<body>\n", 1)[1].split("\n</body>", 1)[0]
    assert body == expected
    check_html(page)


def test_progress_is_quiet_unless_asked(capsys):
    import io

    assert list(track(range(3), "outside a run")) == [0, 1, 2]  # no active run: a no-op
    stream = io.StringIO()
    with Progress(enabled=True, stream=stream).activate():
        assert list(track(range(4), "work")) == [0, 1, 2, 3]
        with step("export"):
            pass
    text = stream.getvalue()
    assert (
        "work:   0%| | 0/4" in text.replace("          ", " ") and "work: done in" in text and "export: done in" in text
    )
    quiet = io.StringIO()
    with Progress(enabled=None, stream=quiet).activate():  # a StringIO is not a terminal
        assert list(track(range(2), "work")) == [0, 1]
        with step("export"):
            pass
    assert quiet.getvalue() == ""
    assert capsys.readouterr().err == ""


def test_report_without_optional_data_draws_what_it_has():
    report = CompressionReport(
        model="m",
        spec={},
        original={"params": 10, "bytes": 40, "linear_flops_per_token": 20},
        compressed={"params": 5, "bytes": 20, "linear_flops_per_token": 10},
        passes=[
            {
                "name": "qkvo_lock",
                "layers": [{"path": "a", "action": "locked", "params_before": 1, "params_after": 1, "details": {}}],
                "details": {},
                "params_before": 1,
                "params_after": 1,
                "seconds": 0.0,
                "verification": None,
            }
        ],
    )
    assert render_plots(report) == []  # no bytes, errors, spectra, KV cache, latency or verification
    report.passes[0]["details"] = {"absorbed": False}
    report.passes[0]["layers"][0]["details"] = {"rope_commuting": True}
    markdown = render_markdown(report)
    assert "absorbed no" in markdown and "| yes |" in markdown  # booleans read as words, not 0/1
    check_html(render_html(markdown))


def test_load_report_errors(tmp_path):
    with pytest.raises(ReportError, match="no report.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ReportError, match="not a graphpress report"):
        load_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2


def _graphpress(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    return subprocess.run(
        [sys.executable, "-m", "graphpress", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900
    )


@pytest.mark.slow
def test_compress_composed_example_shows_progress_and_writes_the_html_report(tmp_path):
    """The acceptance run: the composed example spec from the command line, with progress on."""
    out = tmp_path / "out"
    run = _graphpress(
        "compress", "--model", "examples/tiny_llama", "--spec", "examples/tiny_llama/specs/composed.json",
        "--out", str(out), "--progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for long_step in (
        "capturing tiny_llama (decode) with torch.export",
        "passes[0]: calibrating linear inputs",
        "passes[2] low_rank: factoring",
        "passes[3] weight_clustering: k-means",
        "backends[0] onnx: exporting",
        "backends[0] onnx: validating against eager",
    ):
        assert f"{long_step}: done in" in run.stderr, long_step
    assert "it/s]" in run.stderr  # tqdm bars, not just the step lines
    assert "report.html" in run.stdout

    checker = check_report_dir(out)
    names = {p.name for p in (out / "plots").glob("*.png")}
    assert {"verification.png", "kv-cache.png", "latency.png", "passes-2-spectra.png"} <= names
    assert {"passes-0-gqa_to_mla.png", "passes-2-low_rank.png", "passes-3-weight_clustering.png"} <= names
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == [
        "gqa_to_mla", "kv_cache_quant", "low_rank", "weight_clustering",
    ]  # fmt: skip
    assert report["compressed"]["kv_cache_bytes_per_token"] < report["original"]["kv_cache_bytes_per_token"] / 4
    layer = report["passes"][3]["layers"][0]
    assert 0 < layer["bytes_after"] < layer["bytes_before"]
    latency = report["backends"][0]["latency"]
    assert latency["per"] == "decode step" and latency["artifact_ms"] > 0 and latency["eager_ms"] > 0

    # graphpress report re-renders the same files from the JSON alone
    before = {p.name: p.read_bytes() for p in [out / "report.md", out / "report.html", *(out / "plots").iterdir()]}
    for path in [out / "report.md", out / "report.html", out / "plots" / "latency.png"]:
        path.unlink()
    (out / "plots" / "stale.png").write_bytes(PNG)
    rerun = _graphpress("report", str(out))
    assert rerun.returncode == 0, rerun.stderr
    after = {p.name: p.read_bytes() for p in [out / "report.md", out / "report.html", *(out / "plots").iterdir()]}
    assert after == before
    assert len(check_report_dir(out).images) == len(checker.images)

    inspected = _graphpress("inspect", str(out / "model.onnx"))
    assert inspected.returncode == 0, inspected.stderr
    assert "past_key_values.0.latent" in inspected.stdout and "opset" in inspected.stdout


@pytest.mark.slow
def test_quiet_and_non_terminal_runs_show_no_progress(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "calibration": {"samples": 2, "seq_len": 32},
                "passes": [{"pass": "low_rank", "targets": "layers.0.mlp.*", "rank": 64}],
                "verify": {"max": 1.0},
            }
        )
    )
    base = ["compress", "--model", "examples/tiny_llama", "--spec", str(spec)]
    quiet = _graphpress(*base, "--out", str(tmp_path / "q"), "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""
    piped = _graphpress(*base, "--out", str(tmp_path / "p"))  # stderr is a pipe, not a terminal
    assert piped.returncode == 0, piped.stderr
    assert "done in" not in piped.stderr and "it/s" not in piped.stderr and "parameters" in piped.stdout
    check_report_dir(tmp_path / "p")
    write_report(load_report(tmp_path / "p")[0], tmp_path / "copy")
    assert (tmp_path / "copy" / "report.json").read_bytes() == (tmp_path / "p" / "report.json").read_bytes()
