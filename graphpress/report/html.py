"""The report as one self-contained HTML file: the Markdown report's content, figures inlined.

The HTML is rendered from the Markdown that :func:`render_markdown` writes, so both say
the same thing. Only that Markdown's subset is understood (headings, pipe tables,
``- `` lists, image lines, paragraphs, inline code); figures become ``data:`` URIs so
the file can be mailed or attached to a CI run on its own.
"""

from __future__ import annotations

import base64
import html
import re

from .markdown import PLOTS_DIR
from .plots import Figure

_IMAGE = re.compile(r"^!\[(?P<alt>.*)\]\((?P<src>[^)\s]+)\)$")
_PUNCT = re.compile(r"[!-/:-@\[-`{-~]")  # what a Markdown backslash escapes: ASCII punctuation
_PIPE = re.compile(r"(?<!\\)\|")
_UNESCAPE = re.compile(r"\\(" + _PUNCT.pattern + ")")

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; } th { background: #f4f4f4; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f4f4f4; padding: 0 3px; border-radius: 3px; }
figure { margin: 1em 0; } img { max-width: 100%; } figcaption { color: #666; font-size: 12px; }
""".strip()


def render_html(markdown: str, figures: list[Figure] = ()) -> str:
    sources = {f"{PLOTS_DIR}/{f.name}": f for f in figures}
    title = next((line[2:] for line in markdown.splitlines() if line.startswith("# ")), "graphpress report")
    title = _UNESCAPE.sub(r"\1", title)
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = _take(lines, i, lambda s: s.startswith("|"))
            body.append(_table(block))
            i += len(block)
        elif line.startswith("- "):
            block = _take(lines, i, lambda s: s.startswith("- "))
            body.append("<ul>" + "".join(f"<li>{_inline(item[2:])}</li>" for item in block) + "</ul>")
            i += len(block)
        elif match := _IMAGE.match(line):
            body.append(_figure(match["alt"], match["src"], sources))
            i += 1
        else:
            block = [line, *_take(lines, i + 1, lambda s: bool(s.strip()) and not _starts_block(s))]
            body.append("<p>" + " ".join(_inline(text) for text in block) + "</p>")
            i += len(block)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>\n{_STYLE}\n</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _starts_block(line: str) -> bool:
    return line.startswith(("#", "|", "- ")) or _IMAGE.match(line) is not None


def _take(lines: list[str], start: int, keep) -> list[str]:
    end = start
    while end < len(lines) and keep(lines[end]):
        end += 1
    return lines[start:end]


def _inline(text: str) -> str:
    """Inline Markdown to HTML: code spans kept literal, backslash escapes resolved, everything else escaped."""
    out, plain, code, i = [], [], None, 0
    while i < len(text):
        c = text[i]
        if code is None and c == "\\" and i + 1 < len(text) and _PUNCT.match(text[i + 1]):
            plain.append(text[i + 1])
            i += 2
            continue
        if c == "`":
            if code is None:
                out.append(html.escape("".join(plain), quote=False))
                plain, code = [], []
            else:
                out.append(f"<code>{html.escape(''.join(code), quote=False)}</code>")
                code = None
        else:
            (plain if code is None else code).append(c)
        i += 1
    if code is not None:  # an unclosed span is text
        plain = ["`", *code]
    out.append(html.escape("".join(plain), quote=False))
    return "".join(out)


def _cells(row: str) -> list[str]:
    """A table row's cells; an escaped pipe (``\\|``, also inside code) is a character of its cell."""
    return [cell.strip().replace("\\|", "|") for cell in _PIPE.split(row.strip().strip("|"))]


def _table(rows: list[str]) -> str:
    header, rule, *data = rows
    numeric = [cell.endswith(":") for cell in _cells(rule)]

    def row(cells: list[str], tag: str) -> str:
        return (
            "<tr>"
            + "".join(f"<{tag}{' class=num' if numeric[k] else ''}>{_inline(c)}</{tag}>" for k, c in enumerate(cells))
            + "</tr>"
        )

    return (
        "<table>\n<thead>"
        + row(_cells(header), "th")
        + "</thead>\n<tbody>\n"
        + "\n".join(row(_cells(r), "td") for r in data)
        + "\n</tbody>\n</table>"
    )


def _figure(alt: str, src: str, sources: dict[str, Figure]) -> str:
    figure = sources.get(src)
    uri = f"data:image/png;base64,{base64.b64encode(figure.png).decode('ascii')}" if figure else html.escape(src)
    caption = html.escape(_UNESCAPE.sub(r"\1", alt))
    return f'<figure><img src="{uri}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
