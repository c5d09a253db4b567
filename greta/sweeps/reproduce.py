"""`greta reproduce <sweep dir>`: every point of a sweep reproduced in turn (greta.checks.reproduce), a progress
line per point, and one summary reproduction record (its points' verdicts, links to each point's own).

    rdir, body = reproduce_sweep("outputs/<day>/b3_77-sweep/<id>")   # body["verdict"]: the summary
    rdir, body = reproduce_path(path)                                  # a sweep or a record, whichever it is

The sweep must verify first (greta verify of a sweep, logits files may be absent); the summary verdict is
DIFFERS if any point differs, else NOT_COMPARABLE if any is not comparable, else REPRODUCED.
"""
from __future__ import annotations

import json
from pathlib import Path

from greta.checks.reproduce import OriginalRefused, ReproduceError, reproduce
from greta.checks.reproduce_record import write_reproduction
from greta.record.files import read_member_json
from greta.record.reproduction import REPRODUCTION_FILE, judge_body
from greta.sweeps.layout import VERDICT, points, read_config
from greta.sweeps.verify import is_sweep_dir, verify_sweep
from greta.terminal import echo


def reproduce_sweep(sweep_dir, out_root=None, progress: bool = True, say=None) -> tuple[Path, dict]:
    """Reproduce each declared point of the sweep at sweep_dir; (the summary record, its reproduction.json)."""
    say = say or (lambda line: None)
    d = Path(sweep_dir)
    reasons = verify_sweep(d, allow_missing_large=True)
    if reasons:
        raise OriginalRefused(f"the sweep {echo(str(sweep_dir))} does not verify ({len(reasons)} reason(s); the "
                              f"first: {reasons[0]}): reproduce re-runs only a sealed, intact sweep (see greta verify)")
    cfg = read_config(d)
    names = [pt["name"] for pt in points(cfg["axes"])]
    rows = []
    for i, name in enumerate(names, 1):
        say(f"point {i}/{len(names)} {name}: re-running")
        rdir, body = reproduce(d / "points" / name, out_root=out_root, progress=progress)
        rows.append({"name": name, "verdict": body["verdict"], "reason": body["reason"], "dir": str(rdir)})
        say(f"point {i}/{len(names)} {name}: {body['verdict']}: {body['reason']}")
    sweep_verdict = read_member_json(d, VERDICT).get("verdict")  # verify_sweep read it back already
    body = {"original": {"run_id": d.name, "dir": str(d), "verdict": sweep_verdict}, "points": rows, "params": cfg}
    body["verdict"], body["reason"] = judge_body(json.loads(json.dumps(body)))
    rdir = write_reproduction(out_root or "outputs", body)
    return rdir, json.loads((rdir / REPRODUCTION_FILE).read_text())


def reproduce_path(path, out_root=None, progress: bool = True, say=None) -> tuple[Path, dict]:
    """greta reproduce's one entry (the CLI and notebooks/reproduce.ipynb): a sweep directory point by point,
    anything else as a record. ReproduceError / OriginalRefused (one line) before anything runs."""
    from greta.record.rundir import enclosing_record, nested_message, resolve_out_root

    if not str(path or "").strip():
        raise ReproduceError("no record given: pass a record or sweep directory, e.g. outputs/<day>/b3_77/<run id>")
    try:
        root = resolve_out_root(out_root)
        outer = enclosing_record(root)
        not_folder = root.exists() and not root.is_dir()
    except (OSError, ValueError):  # a name too long, a NUL
        raise ReproduceError(f"-o {echo(str(out_root))} is not a usable folder name; pass -o <a folder>") from None
    if not_folder:
        raise ReproduceError(f"-o {echo(str(out_root))} is not a folder; the records go under a folder, e.g. -o outputs")
    if outer is not None:
        raise ReproduceError(nested_message(out_root, outer))
    run = reproduce_sweep if is_sweep_dir(path) else reproduce
    return run(path, out_root=out_root, progress=progress, say=say)
