"""A sweep directory's layout (docs/RECORD.md, Sweeps): its file names, the points a matrix or config.json
declares, config.json, and whether a point's record is complete. Both the runner (greta.sweeps.sweep) and
the report (greta.sweeps.report) read a sweep through this module, so neither imports the other's reads
(the runner calls the report at the end of a sweep; the report never calls the runner)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from greta.record.files import RecordFileError, Verdict, read_member_json
from greta.record.matrix import combos, point_name
from greta.terminal import shown

CONFIG = "config.json"
VERDICT = "sweep_verdict.json"
LOG = "sweep_log.jsonl"


class SweepError(ValueError):
    """A sweep cannot start or resume (matrix differs from config.json, not a sweep dir); one line."""


def points(axes: dict) -> list[dict]:
    """The points of a matrix's declared axes (Matrix.axes, or a sweep's config.json "axes") in run order:
    [{ctx, kv_aligned, (batch, engine,) seed, dtype, name}]."""
    return [{**c, "name": point_name(c)} for c in combos(axes)]


def read_config(sweep_dir) -> dict:
    p = Path(sweep_dir) / CONFIG
    try:
        cfg = read_member_json(sweep_dir, CONFIG)  # a regular file inside the sweep dir, within its cap
    except FileNotFoundError:
        raise SweepError(f"{sweep_dir} is not a sweep directory (no {CONFIG})") from None
    except (OSError, RecordFileError) as e:
        raise SweepError(f"{p} is unreadable ({e}); the sweep cannot be resumed") from None
    if "axes" not in cfg:
        raise SweepError(f"{p} has no declared matrix (axes)")
    return cfg


def point_complete(point_dir, allow_missing_logits: bool = False) -> tuple[bool, list[str]]:
    """(complete, reasons): the record verifies and is not INTERRUPTED (see greta.sweeps.sweep's doc). Strict by
    default; allow_missing_logits accepts a point committed to git without its logits.npz."""
    from greta.checks.verify import verify

    d = Path(point_dir)
    if not d.is_dir():
        return False, ["no record"]
    reasons = verify(d, allow_missing_large=allow_missing_logits)
    if not reasons and Verdict.read(d).verdict == "INTERRUPTED":
        reasons = ["the run was interrupted"]
    return not reasons, reasons


def log_entry(sweep_dir: Path, **entry) -> None:
    """One line of sweep_log.jsonl. Only the sweep's own process writes the log (a parallel sweep's points
    report to it), so lines never interleave."""
    from greta.record.store import _now

    with open(Path(sweep_dir) / LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps({"t_utc": _now(), **entry}) + "\n")


def say(progress: bool, msg: str) -> None:
    if progress:
        print(shown(f"greta sweep: {msg}"), file=sys.stderr, flush=True)


def verdict_of(point_dir: Path) -> tuple[str | None, str | None]:
    """(verdict, reason) of a point's record, (None, "no verdict.json") without one."""
    try:
        v = Verdict.read(point_dir)
        return v.verdict, v.reason
    except (OSError, RecordFileError):
        return None, "no verdict.json"
