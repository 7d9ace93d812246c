"""`graphpress report` on report.json files it did not write: named errors, inert text, no file outside OUT."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from graphpress.cli import main
from graphpress.report import CompressionReport, load_report, render_html, render_markdown, write_report
from graphpress.report.writer import ReportError

from .test_report import check_html


def layer(path: str = "layers.0.mlp", **extra) -> dict:
    return {"path": path, "action": "factored", "params_before": 64, "params_after": 32, "bytes_before": 256,
            "bytes_after": 128, "details": {"rank": 4, "weight_error": 0.1}, **extra}  # fmt: skip


def report_data(**changes) -> dict:
    data = {
        "model": "m",
        "spec": {},
        "original": {"params": 100, "bytes": 400, "linear_flops_per_token": 200},
        "compressed": {"params": 50, "bytes": 200, "linear_flops_per_token": 100},
        "passes": [{"name": "low_rank", "layers": [layer()], "params_before": 64, "params_after": 32, "seconds": 0.1}],
        "warnings": [],
    }
    data.update(changes)
    return data


def write_json(directory: Path, data) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return directory


def without(data: dict, *path) -> dict:
    data = copy.deepcopy(data)
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return data


def replaced(data: dict, value, *path) -> dict:
    data = copy.deepcopy(data)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


BASE = report_data()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (without(BASE, "original", "params"), r"original\.params: Field required"),
        (without(BASE, "passes", 0, "name"), r"passes\[0\]\.name: Field required"),
        (replaced(BASE, "low_rank", "passes"), r"passes: Input should be a valid list"),
        (
            replaced(BASE, 7, "passes", 0, "layers", 0, "path"),
            r"passes\[0\]\.layers\[0\]\.path: Input should be a valid",
        ),
        (replaced(BASE, 10**30, "original", "bytes"), r"original\.bytes: Input should be less than or equal"),
        (replaced(BASE, -5, "compressed", "params"), r"compressed\.params: Input should be greater than or equal"),
        (replaced(BASE, {"a": 1}, "warnings"), r"warnings: Input should be a valid list"),
        ('{"model": "m", "original": {"bytes": Infinity}}', "Infinity is not a JSON number"),
        ("[" * 100_000, "not a graphpress report"),
        ("[1, 2]", "a JSON list, not an object"),
        ('{"model": ' + "9" * 5000 + "}", "not a graphpress report"),
    ],
    ids=lambda v: None if isinstance(v, str) and v.startswith(("r", "o")) else "",
)
def test_a_malformed_report_is_a_named_error(tmp_path, data, message):
    write_json(tmp_path, data)
    with pytest.raises(ReportError, match=message):
        load_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # nothing rendered


def test_invalid_utf8_is_a_named_error(tmp_path):
    tmp_path.joinpath("report.json").write_bytes(b'{"model": "\xff"}')
    with pytest.raises(ReportError, match="not a graphpress report"):
        load_report(tmp_path)


HOSTILE = [
    "<script>alert(1)</script>",
    "[click](javascript:alert(1))",
    "<javascript:alert(1)>",
    "a|b|c",
    "line\n# injected heading\n| x | y |",
    "http://example.com/x",
    "`code` and <img src=x onerror=alert(1)>",
    "$\\frac{1}{0}$ _em_ **bold**",
]


def hostile_report() -> CompressionReport:
    layers = [layer(path) for path in HOSTILE] + [layer(f"layers.{i}.mlp") for i in range(3)]
    data = report_data(
        model=HOSTILE[0] + HOSTILE[4],
        passes=[
            {
                "name": name,
                "layers": layers,
                "params_before": 1,
                "params_after": 1,
                "seconds": 0.0,
                "details": {HOSTILE[1]: HOSTILE[2]},
            }
            for name in (HOSTILE[0], HOSTILE[7])
        ],  # fmt: skip
        warnings=HOSTILE,
    )
    return CompressionReport.from_dict(data)


def test_report_text_is_inert_in_markdown_and_html():
    report = hostile_report()
    markdown = render_markdown(report)
    ours = [line for line in markdown.splitlines() if line.startswith("#")]
    assert all(line.startswith(("# graphpress report:", "## passes[", "## warnings")) for line in ours), ours
    prose = re.sub(r"`[^`]*`", "", markdown)  # code spans are literal in Markdown: what is left could act
    figures = [line for line in prose.splitlines() if line.startswith("![")]
    assert all(line.endswith(".png)") and "](plots/passes-" in line for line in figures), figures
    assert not re.search(r"(?<!\\)<", prose), "raw HTML"
    assert not re.search(r"(?<!\\)\]\(", prose.replace("](plots/", "")), "a link"
    assert "://" not in prose and "www." not in prose, "an autolink"
    for row in (line for line in markdown.splitlines() if line.startswith("| `")):
        assert len(re.findall(r"(?<!\\)\|", row)) == 9, row  # 8 cells, as in the header
    page = render_html(markdown)
    check_html(page)
    assert "<script" not in page and "<img src=x" not in page and "href" not in page and "javascript:alert" in page
    cells = re.findall(r"<tr><td><code>(.*?)</code></td>", page)
    assert cells[: len(HOSTILE)] == [
        "&lt;script&gt;alert(1)&lt;/script&gt;",
        "[click](javascript:alert(1))",
        "&lt;javascript:alert(1)&gt;",
        "a|b|c",
        "line # injected heading | x | y |",
        "http://example.com/x",
        "'code' and &lt;img src=x onerror=alert(1)&gt;",
        "$\\frac{1}{0}$ _em_ **bold**",
    ]
    for row in re.findall(r"<tr><td><code>.*?</tr>", page):
        assert row.count("<td") == 6 + 2  # every row has the header's cells: path, action, 4 counts, 2 details


def test_plot_names_from_report_data_stay_inside_plots(tmp_path):
    """A pass named like a path cannot put a figure outside OUT/plots, even where that path exists."""
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    name = "../" * 8 + str(outside).lstrip("/") + "/x"
    data = report_data(passes=[{"name": name, "layers": [layer()], "params_before": 1, "params_after": 1,
                                "seconds": 0.0}])  # fmt: skip
    write_json(out, data)
    assert main(["report", str(out)]) == 0
    assert list(outside.iterdir()) == []
    figures = sorted(p.name for p in (out / "plots").iterdir())
    assert figures and all(re.fullmatch(r"passes-0-[A-Za-z0-9_-]+\.png", f) for f in figures), figures
    assert {p.parent for p in out.rglob("*") if p.is_file()} <= {out, out / "plots"}


def test_a_twenty_thousand_layer_report_renders_with_capped_figures(tmp_path):
    layers = [layer(f"layers.{i}.mlp", bytes_before=256 + i) for i in range(20_000)]
    data = report_data(passes=[{"name": "low_rank", "layers": layers, "params_before": 1, "params_after": 1,
                                "seconds": 0.0}])  # fmt: skip
    written = write_report(CompressionReport.from_dict(data), tmp_path)
    markdown = written["report_md"].read_text()
    assert markdown.count("| `layers.") == 20_000
    assert "60 largest of 20000 layers" in markdown
    assert written["plot:passes-0-low_rank.png"].stat().st_size < 2_000_000


def test_hostile_report_renders_through_the_command_line(tmp_path):
    write_json(tmp_path, hostile_report().to_dict())
    assert main(["report", str(tmp_path)]) == 0
    assert "<script" not in (tmp_path / "report.html").read_text()


def test_report_json_is_strict_json_without_non_finite_numbers():
    report = CompressionReport.from_dict(report_data())
    report.passes[0]["verification"] = {"metric": "rel_l2", "max": 0.5, "passed": False, "rel_l2": float("inf")}
    report.original["kv_cache_bytes_per_token"] = float("nan")
    text = report.to_json()

    def refuse(name):
        raise ValueError(name)

    parsed = json.loads(text, parse_constant=refuse)
    assert parsed["passes"][0]["verification"]["rel_l2"] is None
    assert "n/a" in render_markdown(CompressionReport.from_dict(parsed))


def test_a_symlinked_plots_directory_is_replaced_not_cleaned_through(tmp_path):
    """OUT/plots -> a user's folder: publication must not delete (or write) anything in that folder."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("a.png", "notes.txt", "passes-0-low_rank.png"):
        (mine / name).write_text("keep me")
    out = write_json(tmp_path / "out", report_data())
    (out / "plots").symlink_to(mine, target_is_directory=True)
    assert main(["report", str(out)]) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["a.png", "notes.txt", "passes-0-low_rank.png"]
    assert all(p.read_text() == "keep me" for p in mine.iterdir())
    assert not (out / "plots").is_symlink() and (out / "plots" / "passes-0-low_rank.png").read_bytes()[:4] == b"\x89PNG"
