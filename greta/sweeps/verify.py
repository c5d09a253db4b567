"""`greta verify <sweep dir>`: a sweep directory (docs/RECORD.md, Sweeps) verifies when each of its parts does.

  config     config.json is readable and declares the matrix
  points     every declared point has a record under points/ and it verifies (greta.checks.verify)
  log        sweep_log.jsonl holds one JSON object per line, each naming a declared point, and the last verdict
             it logged for a point is the verdict of that point's record
  aggregate  sweep_verdict.json's verdict and reasons are the guardrail recomputed from the points, its points
             map holds each point's verdict and completeness, and the report files it names are there

    reasons = verify_sweep(sweep_dir)   # [] when it verifies; one line per problem, the point named

A sweep directory is untrusted input, as a record is: every file is read through greta.record.members (inside the
directory, a regular file, never a symlink, FIFO or device, within a size cap), and a point whose entry under
points/ is not a plain directory is refused without being entered.
"""
from __future__ import annotations

import json
from pathlib import Path

from greta.checks.verify import verify
from greta.record.files import RecordFileError, read_member_json
from greta.record.members import MemberError, is_member_file, member_kind, read_member
from greta.sweeps.layout import CONFIG, LOG, VERDICT, SweepError, points, read_config, verdict_of

LOG_CAP = 64 << 20  # a sweep's log: one short line per point and action


def is_sweep_dir(d) -> bool:
    """A sweep directory holds config.json (a probe record never does)."""
    return (Path(d) / CONFIG).is_file()


def verify_sweep(sweep_dir, allow_missing_large: bool = False) -> list[str]:
    """Reasons the sweep at sweep_dir does not verify (empty: it does); allow_missing_large as for a record."""
    d = Path(sweep_dir)
    try:
        cfg = read_config(d)
    except SweepError as e:
        return [str(e)]
    names = [pt["name"] for pt in points(cfg["axes"])]
    errors = []
    for name in names:
        kind = _point_kind(d, name)
        if kind != "directory":
            errors.append(f"point {name}: " + ("no record under points/" if kind is None else
                                               f"points/{name} is a {kind}, not a record directory"))
            continue
        errors += [f"point {name}: {r}" for r in verify(d / "points" / name, allow_missing_large=allow_missing_large)]
    errors += _check_log(d, names)
    return errors + _check_aggregate(d, cfg, allow_missing_large)


def _point_kind(d: Path, name: str) -> str | None:
    """What points/<name> is, symlinks not followed ("directory" for a record; None when absent)."""
    try:
        return member_kind(d, f"points/{name}")
    except MemberError as e:
        return e.detail


def _check_log(d: Path, names: list[str]) -> list[str]:
    try:
        lines = read_member(d, LOG, cap=LOG_CAP).decode("utf-8", errors="replace").splitlines()
    except MemberError as e:
        return [f"{LOG} cannot be read ({e.detail})"]
    except OSError as e:
        return [f"{LOG} cannot be read ({e.strerror or e})"]
    errors, last = [], {}
    for i, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            errors.append(f"{LOG} line {i} is not JSON")
            continue
        if not isinstance(entry, dict) or entry.get("point") not in names:
            errors.append(f"{LOG} line {i} names no declared point")
        elif entry.get("verdict") is not None:
            last[entry["point"]] = entry["verdict"]
    for name, logged in last.items():
        stored, _ = verdict_of(d / "points" / name)
        if stored is not None and stored != logged:
            errors.append(f"{LOG} last logged {name} as {logged}, but its record says {stored}")
    return errors


def _check_aggregate(d: Path, cfg: dict, allow_missing_large: bool) -> list[str]:
    from greta.sweeps.report import collect, guardrail

    try:
        stored = read_member_json(d, VERDICT)
    except (OSError, RecordFileError) as e:
        return [f"{VERDICT} cannot be read ({e})"]
    rows = collect(d, allow_missing_logits=allow_missing_large)
    verdict, reasons = guardrail(rows, cfg)
    errors = []
    if stored.get("verdict") != verdict or stored.get("reasons") != reasons:
        errors.append(f"{VERDICT} says {stored.get('verdict')}, but its points give {verdict}: " + " | ".join(reasons)[:300])
    want = {r["name"]: {"verdict": r["verdict"], "complete": r["complete"]} for r in rows}
    if stored.get("points") != want:
        bad = sorted(k for k in set(want) | set(stored.get("points") or {}) if (stored.get("points") or {}).get(k) != want.get(k))
        errors.append(f"{VERDICT} points differ from the records for {', '.join(bad)[:300]}")
    for key in ("report_notebook", "report_html"):
        if stored.get(key) and not is_member_file(d, str(stored[key])):
            errors.append(f"{VERDICT} names {key} {stored[key]}, which is not there")
    return errors
