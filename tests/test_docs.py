"""The docs: a page per pass and per backend, config tables generated from the schema and current,
and no link in README.md or docs/ that points at a missing file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from graphpress.backends import BACKENDS
from graphpress.passes.registry import registered
from graphpress.schema.reference import config_table, main, render

DOCS = Path("docs")


def test_config_tables_are_current():
    assert main(["--check", str(DOCS)]) == 0, "run: python -m graphpress.schema.reference docs"


@pytest.mark.parametrize("name", sorted(registered()))
def test_every_pass_has_a_page(name):
    page = (DOCS / "passes" / f"{name}.md").read_text()
    for part in ("**Paper.**", "**Equation.**", "## Config", "**Tests:**", "Invariants"):
        assert part in page, f"docs/passes/{name}.md lacks {part}"
    config = registered()[name].Config
    assert f"<!-- config: {config.__name__} -->" in page
    assert "perplexity" in page or "Measured" in page or "measured" in page  # the effect on the example LM


@pytest.mark.parametrize("target", sorted(BACKENDS))
def test_every_backend_has_a_page(target):
    page = (DOCS / "backends" / f"{target}.md").read_text()
    assert f"<!-- config: {BACKENDS[target].Config.__name__} -->" in page and "**Tests:**" in page


def test_a_stale_table_is_rewritten():
    from graphpress.schema import LowRankConfig

    stale = "x\n<!-- config: LowRankConfig -->\n| old |\n<!-- /config -->\ny\n"
    fresh = render(stale)
    assert fresh == f"x\n<!-- config: LowRankConfig -->\n{config_table(LowRankConfig)}<!-- /config -->\ny\n"
    assert "`rank_multiple`" in fresh and "`pass`" not in fresh
    with pytest.raises(KeyError, match="NoSuchConfig"):
        render("<!-- config: NoSuchConfig -->\n<!-- /config -->")


def test_relative_links_resolve():
    pages = [Path("README.md"), *DOCS.rglob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("plots/"):
                continue
            assert (page.parent / target).exists(), f"{page}: link to missing {target}"
