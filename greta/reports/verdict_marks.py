"""The machine-readable verdict a record's pages and notebooks carry, written and read here only.

`greta verify` reads what a page or notebook states from these marks, never from its text, so no user string
(a model path, a reason) printed on a page can make an honest record fail, and no comment or invisible
character in the text changes what it states:

- an HTML page of a record opens with ``<meta name="greta-verdict" content="X">`` at a fixed place in its
  head (:func:`page_head`, :func:`page_verdict`: read at that place, never searched for in the body);
- a notebook output that states the record's verdict carries it as JSON under :data:`VERDICT_MIME` beside
  its Markdown (:func:`bundle`, :func:`notebook_verdicts`);
- a notebook that ran before its record was marked INTERRUPTED (it states the probe's verdict, which
  verdict.json keeps as probe_verdict) says so in its metadata (:func:`mark_superseded`, :func:`superseded`).
"""
from __future__ import annotations

import re

VERDICT_MIME = "application/vnd.greta.verdict+json"
_HEAD = '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
_META = '<meta name="greta-verdict" content="{}">'
_PAGE_VERDICT = re.compile(re.escape(_HEAD) + re.escape(_META).replace(r"\{\}", "([A-Z][A-Z0-9_]*)"))
SUPERSEDED = "superseded"  # notebook metadata greta.superseded = {"by": <verdict.json's>, "states": <the probe's>}


def page_head(verdict: str | None) -> str:
    """A page's opening up to its <meta charset>, with the verdict mark when the page belongs to a record."""
    if verdict is None:
        return _HEAD
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", verdict):
        raise ValueError(f"not a verdict token: {verdict!r}")
    return _HEAD + _META.format(verdict)


def page_verdict(page: bytes) -> str | None:
    """The verdict a page's head states (None: the page carries no mark where a record's page has it)."""
    m = _PAGE_VERDICT.match(page[:512].decode("utf-8", errors="replace"))
    return m[1] if m else None


def bundle(verdict: str | None, markdown: str) -> dict:
    """A display bundle (IPython display(..., raw=True)): the Markdown a reader sees and, with a verdict, its
    mark."""
    out = {"text/markdown": markdown}
    if verdict is not None:
        out[VERDICT_MIME] = {"verdict": verdict}
    return out


def notebook_verdicts(nb: dict) -> list:
    """Every verdict a notebook's outputs state through the mark (a malformed mark as itself: never equal)."""
    found = []
    for cell in nb.get("cells", []) if isinstance(nb, dict) else []:
        for out in cell.get("outputs", []) if isinstance(cell, dict) else []:
            data = out.get("data") if isinstance(out, dict) else None
            if isinstance(data, dict) and VERDICT_MIME in data:
                mark = data[VERDICT_MIME]
                found.append(mark.get("verdict") if isinstance(mark, dict) else mark)
    return found


def superseded(nb: dict) -> dict | None:
    """{"by", "states"} when the notebook was marked as having run before its record's final verdict."""
    meta = nb.get("metadata") if isinstance(nb, dict) else None
    mark = ((meta or {}).get("greta") or {}).get(SUPERSEDED) if isinstance(meta, dict) else None
    return mark if isinstance(mark, dict) else None


def mark_superseded(nb, by: str, states: str) -> None:
    """Mark an nbformat notebook (in place) as stating `states`, superseded by the record's verdict `by`."""
    nb.metadata.setdefault("greta", {})[SUPERSEDED] = {"by": by, "states": states}
