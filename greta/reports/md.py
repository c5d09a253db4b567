"""Markdown built from values by construction: every value from outside (params, checkpoint metadata, exception
text, paths, device names) goes through :func:`text` or :func:`code`, which return :class:`Markup`; tables and
lists escape every cell that is not Markup already.

    md.line("Model:", md.code(params["model"]), "· seed", 0)
    md.table(["run", "verdict"], [[label, md.bold(v)]])

The Markdown is rendered twice downstream (GitHub/Jupyter, and nbconvert's mistune with raw HTML passed through,
into a page a browser opens), so a value is escaped for both: the HTML specials ``& < > " '`` as entities, the
Markdown specials that can start markup (emphasis, code, links, tables, math, autolinks, block markers at the
start of a line) with a backslash, line breaks / control / bidi / invisible characters shown as visible code
points, and very long values cut with :data:`CUT_MARK`.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any, Iterable

__all__ = ["Markup", "text", "code", "bold", "line", "heading", "table", "row", "bullets", "shown_as_code_point", "CUT_MARK",
           "MAX_CHARS"]

MAX_CHARS = 2000  # a value longer than this is cut: a report is read by people, and 100k of a path helps no one
CUT_MARK = "… ✂"  # no Markdown or HTML special in it: appended after escaping


class Markup(str):
    """Markdown that is safe to paste as is: made by this module's functions (or a literal of the renderer's
    own), never by formatting an outside value into a string."""


# Quotes stay as they are: with < and > escaped no tag (and so no attribute) can open, and brackets and
# parentheses are escaped below, so a quote cannot start a link title either; report.md stays readable.
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# Inline Markdown that any position can open: backslash escapes, code, emphasis, strikethrough, links and
# images, table cells, math ($, nbconvert's mistune has it).
_ALWAYS = set("\\`*[]|$~")
# At the start of a line (or a list item) these start a heading, a list, a quote or a rule.
_BLOCK_START = re.compile(r"^(#{1,6}|[-+*]|\d{1,9}[.)])(\s|$)|^([-*_=])(\s*\3){2,}\s*$")
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) | {0x200E, 0x200F, 0x061C}


def shown_as_code_point(ch: str) -> bool:
    """Whether ``ch`` is shown as ⟨U+XXXX⟩ instead of itself: line breaks, control characters, bidi
    overrides and other invisible format characters (zero-width, BOM, line/paragraph separators)."""
    return ord(ch) in _BIDI or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def _visible(ch: str) -> str:
    return f"⟨U+{ord(ch):04X}⟩" if shown_as_code_point(ch) else ch


def _cut(s: str, limit: int) -> tuple[str, str]:
    """(the first ``limit`` characters of s, the cut marker or '')."""
    return (s, "") if len(s) <= limit else (s[:limit], f"{CUT_MARK} {len(s) - limit:,} more characters")


def text(value: Any, limit: int = MAX_CHARS) -> Markup:
    """``value`` (any object, by str()) as Markdown text that renders as exactly its characters."""
    if isinstance(value, Markup):
        return value
    s, cut = _cut(str(value), limit)
    out = []
    for i, ch in enumerate(s):
        if ch in _HTML:
            out.append(_HTML[ch])
        elif ch in _ALWAYS:
            out.append("\\" + ch)
        elif ch == "_" and not (0 < i < len(s) - 1 and s[i - 1].isalnum() and s[i + 1].isalnum()):
            out.append("\\_")  # an underscore inside a word (max_abs_diff) never starts emphasis
        elif ch == ":" and s.startswith("//", i + 1):
            out.append("\\:")  # breaks a bare-URL autolink (http://...)
        elif ch == "." and s[max(0, i - 3):i].lower() == "www":
            out.append("\\.")  # breaks a www. autolink
        else:
            out.append(_visible(ch))
    escaped = "".join(out)
    block = _BLOCK_START.match(escaped)
    if block:  # a backslash before the marker's punctuation (before a digit it would show as is)
        at = len(block.group(1)) - 1 if block.group(1) and block.group(1)[0].isdigit() else 0
        escaped = escaped[:at] + "\\" + escaped[at:]
    return Markup(escaped + cut)


def code(value: Any, limit: int = MAX_CHARS) -> Markup:
    """``value`` as an inline code span. A value a code span cannot hold as one span whatever the context (a
    backtick, a table's ``|``, math's ``$``, a character shown as a code point, or one cut for length)
    becomes escaped text instead: the characters stay exactly visible, only the code font is lost."""
    s = str(value)
    plain = len(s) <= limit and not any(ch in "`|$" or shown_as_code_point(ch) for ch in s) and s.strip() == s
    return Markup(f"`{s}`") if plain and s else text(s, limit)


def bold(value: Any) -> Markup:
    return Markup(f"**{text(value)}**")


def line(*parts: Any, sep: str = " ") -> Markup:
    """Parts joined by ``sep`` (a literal of the renderer's), each escaped unless it is Markup already."""
    return Markup(sep.join(text(p) for p in parts))


def heading(level: int, *parts: Any, sep: str = "") -> Markup:
    """A heading of ``level`` whose parts (joined by ``sep``) are escaped unless Markup."""
    return Markup("#" * level + " " + line(*parts, sep=sep))


def bullets(items: Iterable[Any]) -> list[Markup]:
    """One ``- item`` line per item, each escaped unless Markup."""
    return [Markup(f"- {text(x)}") for x in items]


def table(columns: Iterable[Any], rows: Iterable[Iterable[Any]]) -> Markup:
    """A GitHub-Markdown table; every header and cell escaped unless Markup (whose ``|`` md already escaped)."""
    columns = list(columns)
    return Markup("\n".join([row(columns), "|" + "---|" * len(columns), *(row(r) for r in rows)]))


def row(cells: Iterable[Any]) -> Markup:
    """One table row, every cell escaped unless Markup."""
    return Markup("| " + " | ".join(text(c) for c in cells) + " |")
