"""What a record made before its statements were machine-checkable states (metadata.json has no
`statements` format, or an older one; greta.checks.statements checks every later record by re-rendering).

These records' report.md came from earlier renderers, so it cannot be re-rendered byte for byte; their
statements are read from the text as those renderers wrote them. A falsifier who strips the format to land
here still meets: no raw HTML (a comment hides nothing) and no invisible or format character in report.md,
then these rules on the text as written:

report.md (required statements; each one found must agree):
  - every `Verdict: **X**` (and `Verdict from the trace: **X**`) names verdict.json's verdict; at least one does
  - the results table's Verdict column is that verdict, its Max Logits Diff column metrics.json's max_abs_diff
  - `max_abs_diff ≤ T`, `p99_abs_diff ≤ T`, `top1_agreement ≥ T` are params.json's thresholds (required where the
    probe kind judges by them: B3.77's guardrail; the batch probe's bit-exact judgement names none)
  - `Negative control (perturb): P` (and `-p perturb=P`) is params.json's perturb
  - with metrics.json: `bit_exact: **B**` / `bit_exact=B` is its bit_exact, `max diff=D` / `max_abs_diff=D` its
    max_abs_diff (a number agrees when it is the stored one rounded to the digits printed)
*.ipynb (the text of the cells' outputs) and *.html: every `Verdict: **X**` or `Verdict: <strong>X</strong>`
  (a badge: `<strong class="verdict ...">X</strong>`) line names verdict.json's verdict. A page that states no verdict is not checked.
Markdown escapes (`PASS\\_EQUIV`) are read through.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from greta.record.members import entries, read_member
from greta.record.metrics import VERDICTS

_TOKEN = r"([A-Za-z][A-Za-z0-9_\\]*)"
# <strong class="verdict ...">: a page's coloured badge (greta.reports.notebooks.verdict_badges)
VERDICT_LINE = re.compile(r"Verdict(?: from the trace)?:\s*(?:\*\*|<strong(?:\s[^>]*)?>|<b>)\s*" + _TOKEN)
NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
THRESHOLD = {"max_abs_diff": "≤", "p99_abs_diff": "≤", "top1_agreement": "≥"}


def _token(raw: str) -> str:
    return raw.replace("\\", "")


def _agrees(text: str, value) -> bool:
    """The printed number `text` is `value` rounded to the digits it shows."""
    if value is None:
        return False
    mantissa, _, exp = text.lower().lstrip("+-").partition("e")
    decimals = len(mantissa.partition(".")[2])
    half_ulp = 0.5 * 10.0 ** ((int(exp) if exp else 0) - decimals)
    return abs(float(text) - float(value)) <= half_ulp * (1 + 1e-9) + 1e-12 * abs(float(value))


def _verdict_lines(text: str, want: str, where: str) -> tuple[int, list[str]]:
    """(how many verdict statements, the ones naming another verdict as one line each)."""
    found = [_token(m) for m in VERDICT_LINE.findall(text)]
    bad = sorted({v for v in found if v != want})
    return len(found), [f"{where} states the verdict {v} but verdict.json says {want}" for v in bad]


def _table_row(text: str) -> dict[str, str] | None:
    """The results table's first data row, by column header (None when report.md has no such table)."""
    lines = [ln.strip() for ln in text.splitlines()]
    for i, ln in enumerate(lines):
        if ln.startswith("|") and "Verdict" in ln and "Max Logits Diff" in ln and i + 2 < len(lines):
            head = [c.strip() for c in ln.strip("|").split("|")]
            row = [c.strip() for c in lines[i + 2].strip("|").split("|")]
            return dict(zip(head, row)) if len(row) == len(head) else None
    return None


def _check_all(text: str, pattern: str, want, what: str, required: bool, agree=None) -> list[str]:
    """Every match of pattern (one group) in report.md must agree with want; required: at least one."""
    found = re.findall(pattern, text)
    if not found:
        return [f"report.md does not state {what}"] if required else []
    agree = agree or (lambda s, w: _token(s) == str(w))
    bad = sorted({s for s in found if not agree(s, want)})
    return [f"report.md states {what} {s} but the record's data files say {want}" for s in bad]


def _hidden_text(text: str) -> list[str]:
    """What no renderer of Greta ever wrote into report.md (every value goes through greta.reports.md): raw HTML
    that hides text (a comment) and characters a reader cannot see."""
    from greta.reports.md import shown_as_code_point

    errors = ["report.md holds an HTML comment, which hides text from its reader"] if "<!--" in text else []
    hidden = sorted({f"U+{ord(ch):04X}" for ch in text if ch != "\n" and shown_as_code_point(ch)})
    if hidden:
        errors.append(f"report.md holds invisible or control characters ({', '.join(hidden[:5])}), which no renderer writes")
    return errors


def check_report(run_dir: Path, rec, thresholds_required: bool = True) -> list[str]:
    """report.md against verdict.json, params.json and metrics.json (rec: greta.record.files.RecordFiles).
    thresholds_required: the probe kind judges by params.json's thresholds, so report.md must state them."""
    try:
        text = read_member(run_dir, "report.md").decode("utf-8")
    except (OSError, ValueError):
        return []  # absent, not a regular file or not UTF-8: verify's artifacts and manifest checks say so
    v, params, metrics = rec.verdict.verdict, rec.params, rec.metrics
    errors = _hidden_text(text)
    n, found = _verdict_lines(text, v, "report.md")
    errors += found
    if not n:
        errors.append("report.md states no verdict (no `Verdict: **X**` line)")
    row = _table_row(text)
    if row is None:
        errors.append("report.md has no results table (Max Logits Diff ... Verdict)")
    else:
        if _token(row.get("Verdict", "")) != v:
            errors.append(f"report.md's results table says {row.get('Verdict')} but verdict.json says {v}")
        diff = row.get("Max Logits Diff", "")
        if metrics is not None and not (re.fullmatch(NUMBER, diff) and _agrees(diff, metrics.max_abs_diff)):
            errors.append(f"report.md's results table gives max logits diff {diff} but metrics.json "
                          f"max_abs_diff is {metrics.max_abs_diff}")
    thresholds = params.get("thresholds") if isinstance(params.get("thresholds"), dict) else {}
    for key, sign in THRESHOLD.items():
        if key in thresholds:
            pattern = key.replace("_", r"\\?_") + rf"\s*{sign}\s*{NUMBER}"
            errors += _check_all(text, pattern, thresholds[key],
                                 f"the {key} threshold", thresholds_required, _agrees)
    errors += _check_all(text, r"Negative control \(perturb\):\s*`?([^\s·`*]+)", params.get("perturb"), "perturb", True)
    errors += _check_all(text, r"-p perturb=([^\s`]+)", params.get("perturb"), "perturb", False)
    if metrics is not None:
        errors += _check_all(text, r"bit\\?_exact(?::\s*\*\*|=)(True|False)", metrics.bit_exact, "bit_exact", True)
        errors += _check_all(text, r"(?:max diff|max\\?_abs\\?_diff)=" + NUMBER, metrics.max_abs_diff,
                             "max_abs_diff", True, _agrees)
    return errors


def _notebook_text(run_dir: Path, name: str) -> str:
    """The text of a notebook's cell outputs (stream text and every text/* representation)."""
    try:
        nb = json.loads(read_member(run_dir, name).decode("utf-8"))
    except (OSError, ValueError):
        return ""  # an unreadable notebook is the manifest's business, not a statement
    parts = []
    for cell in nb.get("cells", []) if isinstance(nb, dict) else []:
        for out in cell.get("outputs", []) if isinstance(cell, dict) else []:
            if not isinstance(out, dict):
                continue
            chunks = [out.get("text", "")] + [t for k, t in (out.get("data") or {}).items() if k.startswith("text/")]
            parts += ["".join(c) if isinstance(c, list) else str(c) for c in chunks]
    return "\n".join(parts)


def check_pages(run_dir: Path, verdict: str) -> list[str]:
    """Every executed notebook and HTML page of the record that states a verdict states verdict.json's."""
    errors = []
    for name, kind in entries(run_dir).items():  # only the regular files at the top; the rest is the manifest's
        if kind != "file" or "/" in name or Path(name).suffix not in (".ipynb", ".html"):
            continue
        if name.endswith(".ipynb"):
            text = _notebook_text(run_dir, name)
        else:
            try:
                text = read_member(run_dir, name).decode("utf-8", errors="replace")
            except (OSError, ValueError):
                continue  # gone or grown past its cap since listed: the manifest check says so
        errors += _verdict_lines(text, verdict, name)[1]
    return errors


assert all(re.fullmatch(_TOKEN, v) for v in VERDICTS)  # every verdict token is read whole
