"""The record of a reproduction (greta reproduce): written and sealed here, checked by greta verify.

    <out>/<day>/reproduce/<HHMMSS>-<original run id>-<4 hex>/
        reproduction.json   everything found (a sweep's: each point's verdict and reproduction record): the original and the re-run (run id, path relative to this
                            record, verdict), the environment compared, the bits compared, the verdict
        verdict.json        {"verdict", "reason"}: REPRODUCED | DIFFERS | NOT_COMPARABLE
        params.json         the original's params, which the re-run ran
        report.md           rendered from reproduction.json alone (greta.reports.reproduce_report)
        manifest.json       the seal (greta.record.store.seal)

greta verify holds it to itself: the verdict follows from the stored comparison (greta.record.reproduction.judge),
verdict.json and params.json say what reproduction.json says, and report.md is its rendering, byte for byte.
"""
from __future__ import annotations

from pathlib import Path

from greta.record.files import RecordFileError, atomic_write_text, read_member_json, write_json
from greta.record.members import MemberError, read_member
from greta.record.reproduction import FORMAT, REPRODUCTION_FILE, REPRODUCTION_VERDICTS, judge_body
from greta.reports.reproduce_report import render_reproduction

KIND = "reproduce"  # the run-directory kind: <out>/<day>/reproduce/<id>


def write_reproduction(out_root, body: dict) -> Path:
    """A fresh, sealed reproduction record under out_root (body: reproduction.json's dict without the links'
    relative paths, which are filled in here from the "dir" of body["original"], body["rerun"] and each of a
    sweep's body["points"]: :func:`link_path`)."""
    import shutil

    from greta.record.rundir import allocate_run_dir
    from greta.record.store import RecordError, seal
    from greta.terminal import echo

    d = allocate_run_dir(out_root, KIND, [body["original"]["run_id"]])
    body = {"format": FORMAT, **body}
    for ref in (body.get("original"), body.get("rerun"), *body.get("points", ())):
        if ref and "dir" in ref:
            path = link_path(ref.pop("dir"), d)
            if path is not None:
                ref["path"] = path
    try:
        write_json(d / "params.json", body["params"])
        write_json(d / REPRODUCTION_FILE, body)
        write_json(d / "verdict.json", {"verdict": body["verdict"], "reason": body["reason"]})
        atomic_write_text(d / "report.md", render_reproduction(body))
        seal(d, body["params"])
    except BaseException as e:  # Ctrl-C or a full disk before the seal: the record is whole or not there at all
        shutil.rmtree(d, ignore_errors=True)
        if isinstance(e, OSError):
            raise RecordError(f"could not write the reproduction record in {echo(str(d))} ({e.strerror or e}); "
                              "nothing of it was left: free space and rerun") from None
        raise
    return d


def link_path(target, d: Path) -> str | None:
    """How reproduction record ``d`` links a record it names (by run id always): by its path relative to ``d``
    where both lie in one output folder (<out>/<day>/reproduce/<id>), else by none (a path out of that folder
    would name this machine's folders)."""
    import os

    out_root, target = d.resolve().parents[2], Path(target).resolve()
    if out_root not in target.parents:
        return None
    return Path(os.path.relpath(target, d.resolve())).as_posix()


def check_reproduction(d: Path, rec) -> list[str]:
    """greta verify of a reproduction record (rec: greta.record.files.read_record of it)."""
    try:
        body = read_member_json(d, REPRODUCTION_FILE)
    except (FileNotFoundError, RecordFileError) as e:
        return [f"{REPRODUCTION_FILE} cannot be read: {e}"]
    errors = rec.problem_lines(["params.json", "verdict.json"])
    v = body.get("verdict")
    if v not in REPRODUCTION_VERDICTS:
        return errors + [f"{REPRODUCTION_FILE} says {v!r}, not one of {', '.join(REPRODUCTION_VERDICTS)}"]
    try:
        again = judge_body(body)
        rendered = render_reproduction(body).encode("utf-8")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return errors + [f"{REPRODUCTION_FILE} cannot be judged: {type(e).__name__}: {e}"]
    if again != (v, body.get("reason")):
        errors.append(f"{REPRODUCTION_FILE} says {v} ({body.get('reason')!r}) but its stored comparison gives "
                      f"{again[0]} ({again[1]!r})")
    if rec.verdict is not None and (rec.verdict.verdict, rec.verdict.reason) != (v, body.get("reason")):
        errors.append(f"verdict.json says {rec.verdict.verdict}, {REPRODUCTION_FILE} says {v}")
    if rec.params is not None and rec.params != body.get("params"):
        errors.append(f"params.json differs from the params in {REPRODUCTION_FILE}")
    if rec.manifest is not None and rec.manifest.params != body.get("params"):
        errors.append(f"the manifest's params differ from the params in {REPRODUCTION_FILE}")
    try:
        if read_member(d, "report.md") != rendered:
            errors.append(f"report.md is not the rendering of {REPRODUCTION_FILE} (edited after it was written)")
    except FileNotFoundError:
        errors.append("report.md is missing")
    except (MemberError, OSError) as e:
        errors.append(f"report.md cannot be read: {e}")
    return errors
