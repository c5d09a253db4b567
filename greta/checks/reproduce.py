"""`python -m greta reproduce <record>`: re-run a record on this machine and say whether the bits are the same.

    rdir, body = reproduce("outputs/2026-12-05/b3_77/<run id>")   # body["verdict"]: REPRODUCED | DIFFERS | NOT_COMPARABLE

1. The original must verify (greta verify, its logits file may be absent: committed records leave it out);
   anything else is refused in one line before anything runs.
2. Its params.json is re-run as it is, by the probe runner every record comes from (greta.probe.runner), on the
   device its params name: the re-run is a record of its own, beside the others under the output folder.
3. The environment and inputs each metadata.json records are compared, then the bits: the logits file when
   both hold one, else the fingerprints in metrics.json (greta.record.reproduction says what decides what).
4. A reproduction record links both (greta.checks.reproduce_record) and is sealed; greta verify accepts it.
"""
from __future__ import annotations

import json
from pathlib import Path

from greta.checks.reproduce_record import write_reproduction
from greta.checks.verify import verify
from greta.probe.kinds import UnknownKind, record_kind
from greta.record.files import MANIFEST, read_record
from greta.record.members import is_member_file, load_npz, member_kind
from greta.record.reproduction import (REPRODUCTION_FILE, compare_fingerprints, compare_logits,
                                       environment_differences, judge_body)
from greta.terminal import echo


class ReproduceError(ValueError):
    """Bad input (no such directory, not a probe record, -o inside a record): one line, nothing ran."""


class OriginalRefused(ValueError):
    """The original does not verify (unsealed, tampered, broken): one line, nothing ran."""


def check_original(run_dir):
    """(the record directory, its files read) once it is a sealed probe record that verifies; else one line."""
    d = Path(run_dir)
    hint = "pass a record directory, e.g. outputs/<day>/b3_77/<run id>"
    if not d.exists():
        raise ReproduceError(f"{echo(str(run_dir))} does not exist: {hint}")
    if not d.is_dir():
        raise ReproduceError(f"{echo(str(run_dir))} is not a directory: {hint}")
    if member_kind(d, MANIFEST) is None and member_kind(d, "params.json") is None:
        raise ReproduceError(f"{echo(str(run_dir))} is not a record (no manifest.json or params.json): {hint}")
    for name, what in ((REPRODUCTION_FILE, "a reproduction"), ("oracle.json", "an oracle record")):
        if member_kind(d, name) is not None:
            raise ReproduceError(f"{echo(str(run_dir))} is {what}, not a probe record: reproduce its original instead")
    reasons = verify(d, allow_missing_large=True)
    if reasons:
        raise OriginalRefused(f"{echo(str(run_dir))} does not verify ({len(reasons)} reason(s); the first: {reasons[0]}): "
                              f"reproduce re-runs only a sealed, intact record (see greta verify)")
    return d, read_record(d)


def _params(d: Path, rec):
    from greta.record.params import ParamError, Params

    try:
        return Params.from_dict(rec.params, source=f"params.json of {echo(d.name)}")
    except ParamError as e:
        raise ReproduceError(f"{e}: this checkout cannot re-run the record") from None


def _nothing_to_compare(d: Path, rec, kind) -> str | None:
    """Why the original holds nothing to compare bits with (no logits file, no fingerprints), or None."""
    if is_member_file(d, kind.logits_file) or kind.fingerprint_rows(rec.metrics.figures() if rec.metrics else None):
        return None
    v = rec.verdict.verdict if rec.verdict else None
    why = f" (it is a {v} record: its probe stopped before the reference phase)" if v not in kind.verdicts else ""
    return (f"the original holds neither {kind.logits_file} nor fingerprints in metrics.json{why}: there are no "
            "bits to compare (no fingerprints), so it was not re-run")


def _ref(d: Path, rec) -> dict:
    return {"run_id": d.name, "dir": str(d), "verdict": rec.verdict.verdict if rec.verdict else None}


def _compare_bits(d: Path, rec, rerun: Path, rrec, kind) -> dict:
    """The logits file of both when both hold it, else the fingerprints."""
    if is_member_file(d, kind.logits_file) and is_member_file(rerun, kind.logits_file):
        metrics = rec.metrics.figures() if rec.metrics else {}
        return compare_logits(load_npz(d, kind.logits_file), load_npz(rerun, kind.logits_file), kind.row_path(metrics))
    return compare_fingerprints(kind.fingerprint_rows(rec.metrics.figures()),
                                kind.fingerprint_rows(rrec.metrics.figures() if rrec.metrics else None) or [])


def _rerun(params, out_root, progress: bool) -> Path:
    from greta.probe.runner import run_probe
    from greta.record.store import new_probe_dir

    return Path(run_probe(params, run_dir=new_probe_dir(out_root, params), progress=progress))


def reproduce(run_dir, out_root=None, progress: bool = True, say=None) -> tuple[Path, dict]:
    """Re-run the record at run_dir here; (the reproduction record, its reproduction.json). Raises
    ReproduceError / OriginalRefused (one line) before anything runs, ProbeInterrupted on Ctrl-C."""
    from greta.probe.preflight import preflight
    from greta.record.params import ParamError

    say = say or (lambda line: None)
    d, rec = check_original(run_dir)
    params = _params(d, rec)
    try:
        kind = record_kind(rec.params)
    except UnknownKind as e:
        raise ReproduceError(str(e)) from None
    body = {"original": _ref(d, rec), "rerun": None, "environment": None, "comparison": None, "skipped": None,
            "rerun_fault": None, "params": rec.params}
    body["skipped"] = _nothing_to_compare(d, rec, kind)
    if body["skipped"] is None:
        try:
            params = preflight(params)
        except ParamError as e:
            body["skipped"] = f"this machine cannot run it ({e}), so it was not re-run"
    if body["skipped"] is None:
        say(f"re-running {d.name} ({kind.name}, device {params.device}) ...")
        rerun = _rerun(params, out_root, progress)
        rrec = read_record(rerun)
        body["rerun"] = _ref(rerun, rrec)
        body["environment"] = environment_differences(rec.metadata.to_dict(), rrec.metadata.to_dict(), params.device)
        if rrec.verdict and rrec.verdict.verdict in kind.verdicts:
            body["comparison"] = _compare_bits(d, rec, rerun, rrec, kind)
        else:
            v = rrec.verdict
            body["rerun_fault"] = f"{v.verdict} in {v.failed_phase}: {v.reason}" if v else "no verdict.json"
    body = json.loads(json.dumps(body))  # judged in the form verify reads back
    body["verdict"], body["reason"] = judge_body(body)
    rdir = write_reproduction(out_root or "outputs", body)
    return rdir, json.loads((rdir / REPRODUCTION_FILE).read_text())
