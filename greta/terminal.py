"""Text from outside (paths, model names, params, exception messages) on its way to a terminal or a log line.

`shown(text)`: what greta prints. Every character a terminal would act on instead of showing (control
characters and escape sequences, bidi overrides and isolates, zero-width and other format characters, line
and paragraph separators, lone surrogates from undecodable file names) is written as a visible escape
(`\\x1b`, `\\u202e`), so no input can colour the terminal, set its title, move the cursor, reorder a line or
forge one. `lines=True` keeps the newlines of a block greta formats itself.

`brief(text, limit)`: one line of at most about `limit` characters that keeps its reason: the longest words
(an echoed 10,000-character path) are shortened in the middle first, and only then is the tail cut.

Every print of greta's goes through `shown`; every bounded error message through `brief`.
"""
from __future__ import annotations

__all__ = ["shown", "brief", "echo"]

KEEP = 24  # characters kept at each end of a word brief shortens


def _escape(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else (f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}")


def shown(text, lines: bool = False) -> str:
    """text with every character that is not printable (str.isprintable: categories Cc, Cf, Cs, Co, Cn, Zl,
    Zp, and Zs other than the space) as a visible escape; with lines=True, "\\n" stays a line break."""
    s = str(text)
    if s.isprintable():
        return s
    if lines:
        return "\n".join(shown(part) for part in s.split("\n"))
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in s)


def echo(value, limit: int = 120) -> str:
    """A value echoed in a message: its repr, shortened in the middle past `limit` characters."""
    r = repr(value) if isinstance(value, str) else str(value)
    return _middle(r, limit)


def _middle(word: str, limit: int) -> str:
    if len(word) <= limit:
        return word
    keep = max(4, (limit - 20) // 2)
    return f"{word[:keep]}...({len(word)} chars)...{word[-keep:]}"


def brief(text, limit: int = 300) -> str:
    """text on one line (whitespace runs as one space), at most limit characters; the longest words are
    shortened in the middle first, so the reason after an echoed value survives; then the line's middle."""
    words = str(text).split()
    line = " ".join(words)
    excess = len(line) - limit
    for i in sorted(range(len(words)), key=lambda j: -len(words[j])):
        if excess <= 0:
            break
        short = _middle(words[i], 2 * KEEP + 20)
        excess -= len(words[i]) - len(short)
        words[i] = short
    line = " ".join(words)
    if len(line) <= limit:
        return line
    head = (limit - 5) * 3 // 5  # still too long: cut the middle, so the start (what) and the end (the fix) stay
    return line[:head] + " ... " + line[len(line) - (limit - 5 - head):]
