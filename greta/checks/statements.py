"""What a record's human-readable files state must be what its data files say (greta verify).

A record whose metrics and verdict were rewritten and resealed could otherwise verify while report.md, its
notebooks and HTML pages still show the old verdict; and a report.md edited to hide the real verdict (an HTML
comment, a zero-width character) could pass for the data's. So nothing is read out of the text:

report.md   is rendered again by the record's probe kind from the record's data files (params, metadata,
            perf, metrics, vram, verdict) and must equal the stored file byte for byte: every statement,
            figure and table follows from the data, and anything else in the file (a comment, an invisible
            character, an added line) is a difference. A user string (a model path holding "Verdict: **X**")
            is rendered again the same way, so it can never make an honest record differ.
*.html      opens with the verdict's mark (greta.reports.verdict_marks.page_head), which must be verdict.json's.
*.ipynb     every output that states the verdict carries its mark, each verdict.json's; a notebook marked as
            run before its record became INTERRUPTED (metadata greta.superseded) states the probe's verdict,
            which verdict.json keeps as probe_verdict.

Records made before this (metadata.json's `statements` is not greta.record.files.STATEMENTS_FORMAT) are read
by greta.checks.statements_legacy.
"""
from __future__ import annotations

import json
from pathlib import Path

from greta.checks import statements_legacy as legacy
from greta.probe.kinds import UnknownKind, record_kind
from greta.record.files import STATEMENTS_FORMAT, RecordFileError
from greta.record.members import entries, read_member
from greta.reports.verdict_marks import notebook_verdicts, page_verdict, superseded


def check_statements(run_dir: Path, rec, thresholds_required: bool = True) -> list[str]:
    """report.md, the notebooks and the pages of a record against its data files (rec: read_record's)."""
    if rec.metadata is None or rec.metadata.statements != STATEMENTS_FORMAT:
        return (legacy.check_report(run_dir, rec, thresholds_required)
                + legacy.check_pages(run_dir, rec.verdict.verdict))
    return check_report(run_dir, rec) + check_pages(run_dir, rec.verdict.to_dict())


def rendered_report(rec) -> str:
    """report.md as the record's probe kind renders it from the record's data files."""
    return record_kind(rec.params).render(
        rec.params, rec.metadata.to_dict(), rec.perf.to_dict(), rec.metrics.to_dict() if rec.metrics else None,
        rec.vram.to_dict(), rec.verdict.to_dict())


def check_report(run_dir: Path, rec) -> list[str]:
    """report.md is the re-render of the record's data, byte for byte (one line naming the first difference)."""
    try:
        stored = read_member(run_dir, "report.md")
    except (OSError, ValueError):
        return []  # absent, not a regular file: verify's artifacts and manifest checks say so
    if rec.perf is None or rec.vram is None:
        return []  # a data file is unreadable: verify names it; there is nothing to render from
    try:
        again = rendered_report(rec).encode("utf-8")
    except (UnknownKind, RecordFileError, KeyError, TypeError, ValueError, AttributeError) as e:
        return [f"report.md cannot be rendered again from the record's data ({type(e).__name__}: {e}), so what it "
                "states cannot be checked"]
    if stored == again:
        return []
    return [f"report.md is not what the record's data files render to ({_first_difference(stored, again)}): it "
            "states something the data does not say"]


def _first_difference(stored: bytes, again: bytes) -> str:
    """Where report.md first departs from the re-render, as "line N"."""
    a, b = stored.split(b"\n"), again.split(b"\n")
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"line {i + 1} differs"
    return f"{len(a)} lines where the data render to {len(b)}"


def check_pages(run_dir: Path, verdict: dict) -> list[str]:
    """Every HTML page carries verdict.json's verdict in its mark; every notebook's verdict marks agree."""
    errors = []
    for name, kind in entries(run_dir).items():  # only the regular files at the top; the rest is the manifest's
        if kind != "file" or "/" in name or Path(name).suffix not in (".ipynb", ".html"):
            continue
        try:
            data = read_member(run_dir, name)
        except (OSError, ValueError):
            continue  # gone or grown past its cap since listed: the manifest check says so
        errors += _check_page(name, data, verdict) if name.endswith(".html") else _check_notebook(name, data, verdict)
    return errors


def _check_page(name: str, page: bytes, verdict: dict) -> list[str]:
    stated = page_verdict(page)
    if stated is None:
        return [f"{name} carries no verdict mark in its head (<meta name=\"greta-verdict\">)"]
    if stated != verdict.get("verdict"):
        return [f"{name} states the verdict {stated} but verdict.json says {verdict.get('verdict')}"]
    return []


def _check_notebook(name: str, data: bytes, verdict: dict) -> list[str]:
    try:
        nb = json.loads(data.decode("utf-8"))
    except ValueError:
        return [f"{name} is not a notebook (not JSON)"]
    want, old = verdict.get("verdict"), superseded(nb)
    if old is not None:  # ran before an interrupt made the record INTERRUPTED: it states the probe's verdict
        probe = verdict.get("probe_verdict")
        if old.get("by") != want or probe is None or old.get("states") != probe:
            return [f"{name} is marked as stating {old.get('states')!r} before the record became {old.get('by')!r}, "
                    f"but verdict.json says {want} (the probe's verdict: {probe})"]
        want = probe
    bad = sorted({str(v) for v in notebook_verdicts(nb) if v != want})
    return [f"{name} states the verdict {v} but verdict.json says {want}" for v in bad]
