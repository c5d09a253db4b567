"""`python -m greta verify <run-dir>`: is a record complete, untampered and self-consistent?

Checks (each failure is one line of the returned list; an empty list means the record verifies):
  manifest    manifest.json is there; every name it lists is a plain path inside the record, a regular file
              (no symlink, FIFO or device) of the listed bytes and sha256; no entry of any kind (dot-files,
              directories, symlinks included) is unlisted
  params      params.json equals the manifest's params, and metadata.json agrees (run id, seed, model)
  phases      perf.json has every phase; a finished run has all of them ok; a fault record has its
              failed phase with the status its verdict names, and nothing run after it
  artifacts   the files every record has, plus metrics.json and logits.npz when the reference phase ran
  vram        no measured peak (sampled or allocator) is below the analytic weights + KV floor
  verdict     the stated verdict is the one the stored metrics give under the stored thresholds
  fingerprints  metrics.json's bit_exact holds exactly when every position's logits hashes are equal, and
              the top-1 ids give its argmaxes and top1_agreement (greta.record.fingerprints; without logits.npz;
              each probe kind's own: greta.probe.kinds, fingerprint_problems)
  statements  report.md is, byte for byte, what the record's data files render to; every HTML page's and
              notebook output's verdict mark is verdict.json's verdict (greta.checks.statements; records made
              before the marks: greta.checks.statements_legacy)
  seal key    with GRETA_SEAL_KEY set, manifest.json carries the HMAC of its content under that key
  logits      when logits.npz is there, greta.checks.analyze recomputes the metrics and verdict from it and
              they must equal the stored ones
Every file is read through greta.record.members (the one safe reader: inside the record, never through a
symlink, only regular files, a size cap per kind, never blocking), the JSON ones by greta.record.files.read_record.
An oracle record (oracle.json, from `greta oracle -o`) gets the manifest check and its own: the limits follow
from the stated tolerance and the verdict from the stored numbers. A reproduction record (reproduction.json, from
`greta reproduce`) gets the manifest check and its own (greta.checks.reproduce_record.check_reproduction).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

from greta.checks.reproduce_record import check_reproduction
from greta.checks.statements import check_statements
from greta.probe.kinds import KINDS, UnknownKind, record_kind
from greta.record.kinds import kind_name
from greta.record.files import MANIFEST, RecordFiles, read_record
from greta.record.members import (NOT_REGULAR, MemberError, entries, is_member_file, member_kind, name_problem,
                                  open_member)
from greta.record.metrics import FAIL, FAULT_VERDICTS
from greta.record.params import PHASES
from greta.record.reproduction import REPRODUCTION_FILE
from greta.record.store import SEAL_KEY_ENV, seal_hmac
from greta.terminal import echo

BASE = ("params.json", "metadata.json", "perf.json", "vram.json", "vram_samples.csv", "verdict.json", "report.md")
# verdict -> the perf.json statuses its failed phase may end with (the inverse of metrics.FAIL)
FAULT_STATUS = {v: {s for s, w in FAIL.items() if w == v} for v in FAULT_VERDICTS}
LARGE = tuple(k.logits_file for k in KINDS.values())  # listed in the manifest but kept out of git
JUDGED = tuple(v for k in KINDS.values() for v in k.verdicts)  # the reference phase ran: judged from the logits
UNLISTED_SHOWN = 20  # unlisted entries named one by one; past that, a count


def _check_manifest(d: Path, allow_missing_large: bool, rec: RecordFiles | None = None) -> tuple[dict | None, list[str]]:
    """(the manifest as read, reasons): every listed file is a regular file inside the record with its size
    and sha256, no entry of any kind is unlisted, and with GRETA_SEAL_KEY set the HMAC matches."""
    rec = rec or read_record(d)
    errors = rec.problem_lines([MANIFEST])
    man = rec.manifest
    if man is None:
        return None, errors
    if not isinstance(man.files, dict):
        return None, errors + ["manifest.json's files is not an object of name -> {sha256, bytes}"]
    for name, entry in man.files.items():
        errors += _check_listed(d, name, entry, allow_missing_large)
    errors += _check_unlisted(d, man.files)
    key = os.environ.get(SEAL_KEY_ENV)
    if key:
        if man.hmac is None:
            errors.append(f"manifest.json carries no HMAC though {SEAL_KEY_ENV} is set: it was sealed without the key")
        elif seal_hmac(man.to_dict(), key) != man.hmac:
            errors.append(f"manifest.json's HMAC does not match under {SEAL_KEY_ENV}: it was resealed without the key, or edited")
    return man.to_dict(), errors


def _check_listed(d: Path, name, entry, allow_missing_large: bool) -> list[str]:
    """One manifest entry: a plain name inside the record, a regular file of the stated bytes and sha256."""
    why = name_problem(name)
    if why or name == MANIFEST:
        return [f"manifest.json lists {echo(name)}, which {why or 'is the manifest itself'}: a manifest names "
                "only files inside its record"]
    if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and type(entry.get("bytes")) is int):
        return [f"manifest.json's entry for {name} is not {{\"sha256\": <hex>, \"bytes\": <int>}}"]
    try:
        with open_member(d, name) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry["bytes"]:
                return [f"{name} changed after the record was sealed ({size} bytes, the manifest says {entry['bytes']})"]
            digest = _sha256(f, size)
    except FileNotFoundError:
        if allow_missing_large and name in LARGE:
            return []
        return [f"{name} is listed in the manifest but missing"]
    except MemberError as e:
        return [str(e)]
    except OSError as e:
        return [f"{name} cannot be read: {e.strerror or e}"]
    if digest != entry["sha256"]:
        return [f"{name} changed after the record was sealed (sha256 differs from the manifest)"]
    return []


def _sha256(f, size: int) -> str | None:
    """sha256 of the open file's first `size` bytes; None when it holds more or fewer (changed while read)."""
    h, left = hashlib.sha256(), size
    while left > 0:
        block = f.read(min(left, 1 << 20))
        if not block:
            return None
        h.update(block)
        left -= len(block)
    return h.hexdigest() if not f.read(1) else None


def _check_unlisted(d: Path, files: dict) -> list[str]:
    """Every entry of the record directory (dot-files, directories, symlinks, FIFOs... alike) that the manifest
    does not list; a directory is listed when a listed file lies under it. One line per unlisted entry, none
    for what lies under an unlisted directory."""
    listed = set(files) | {MANIFEST}
    dirs = {str(p) for n in files if isinstance(n, str) for p in PurePosixPath(n).parents if str(p) != "."}
    errors, reported = [], set()
    for rel, kind in entries(d).items():
        if rel in listed or (kind == "directory" and rel in dirs):
            continue  # a listed name that is not a regular file is _check_listed's
        if any(str(p) in reported for p in PurePosixPath(rel).parents):
            continue  # inside an unlisted directory, which was named
        reported.add(rel)
        if len(reported) > UNLISTED_SHOWN:
            continue
        errors.append(f"{rel} is not in the manifest (added after sealing)" if kind == "file" else
                      f"{rel} is a {kind} not in the manifest: a record holds only the files its manifest lists")
    if len(reported) > UNLISTED_SHOWN:
        errors.append(f"... and {len(reported) - UNLISTED_SHOWN} more entries not in the manifest")
    return errors


def _artifact_problem(d: Path, name: str) -> str | None:
    """A file every record has: missing, or not a regular file (then named by what it is)."""
    kind = member_kind(d, name)
    if kind == "file":
        return None
    return f"{name} is missing" if kind is None else f"{name} is a {kind}, {NOT_REGULAR}"


def _check_oracle(d: Path, rec: RecordFiles) -> list[str]:
    """An oracle record (greta oracle -o): its verdict and limits follow from its stored numbers."""
    from greta.checks.oracle import TOLERANCES, _within, verdict

    errors = rec.problem_lines(["params.json", "oracle.json"])
    params, body = rec.params, rec.oracle
    for name in ("report.md", "oracle.png"):
        problem = _artifact_problem(d, name)
        errors += [problem] if problem else []
    if rec.manifest is not None and params is not None and rec.manifest.params != params:
        errors.append("params.json differs from the params in the manifest")
    if body is None:
        return errors
    try:
        tol = body["tolerance"]
        if tol != TOLERANCES.get(body["dtype"]):
            errors.append(f"oracle.json tolerance {tol} is not Greta's stated {body['dtype']} tolerance")
        runs = [body] + ([body["control"]] if "control" in body else [])
        for r in runs:
            for p in ("prefill", "decode"):
                want = (tol["rel_factor"] * body["transformers_bf16"][p]["rel"]) if "rel_factor" in tol else tol["rel"]
                if abs(r[p]["limit_rel"] - want) > 1e-12 * max(1.0, want):
                    errors.append(f"{p} limit_rel {r[p]['limit_rel']} does not follow from the tolerance ({want})")
            r["ok"] = _within(r, tol)
        again = verdict(body)
    except (KeyError, TypeError, ValueError) as e:
        return errors + [f"oracle.json cannot be judged: {type(e).__name__}: {e}"]
    if again != body.get("verdict"):
        errors.append(f"oracle.json says {body.get('verdict')}, but its stored numbers give {again}")
    return errors


def _check_identity(d: Path, rec: RecordFiles) -> list[str]:
    """params.json equals the manifest's, and metadata.json names the same run, seed and model."""
    errors = []
    params, meta = rec.params, rec.metadata
    if rec.manifest is not None and params is not None and rec.manifest.params != params:
        errors.append("params.json differs from the params in the manifest")
    if params is not None and meta is not None:
        for key in ("seed", "model"):
            if getattr(meta, key) != params.get(key):
                errors.append(f"metadata.json {key}={getattr(meta, key)!r} but params.json {key}={params.get(key)!r}")
        if meta.run_id not in (None, d.name):
            errors.append(f"metadata.json run_id {meta.run_id!r} is not the directory name {d.name!r}")
    return errors


def _check_vram(rec: RecordFiles) -> list[str]:
    vs, errors = rec.vram, []
    if vs is None:
        return errors
    if vs.below_floor:
        errors.append("a VRAM figure is below the weights + KV floor: " + "; ".join(vs.below_floor_figures))
    floor = (vs.floor or {}).get("total_mb")
    peak = vs.peak_vram_mb
    loaded = rec.perf is None or rec.perf.status("load") == "ok"  # else weights + KV never existed
    if loaded and floor is not None and peak is not None and peak < floor:
        errors.append(f"sampled VRAM peak {peak} MB is below the analytic floor {floor} MB")
    for r in vs.extra.get("ranks") or []:  # tensor parallel: every rank against its own (per-rank) floor
        if not isinstance(r, dict):
            errors.append("vram.json ranks holds an entry that is not an object")
            continue
        if r.get("below_floor"):
            errors.append(f"rank {r.get('rank')}: a VRAM figure is below the weights + KV floor: "
                          + "; ".join(map(str, r.get("below_floor_figures") or [])))
        rpeak = r.get("peak_vram_mb")
        if loaded and floor is not None and isinstance(rpeak, (int, float)) and rpeak < floor:
            errors.append(f"rank {r.get('rank')}: sampled VRAM peak {rpeak} MB is below the analytic floor {floor} MB")
    return errors


def _check_judgement(rec: RecordFiles) -> list[str]:
    """The stated verdict is the one the stored metrics give, by the rules of the record's probe kind."""
    if rec.params is None:
        return []
    try:
        kind = record_kind(rec.params)
    except UnknownKind as e:
        return [f"params.json: {e}"]
    v = rec.verdict.verdict if rec.verdict else None
    if v in JUDGED and v not in kind.verdicts:  # another kind's verdict (an unknown one: _check_phases)
        return [f"verdict.json says {v}, which is not a verdict of the {kind.name} probe ({', '.join(kind.verdicts)})"]
    return kind.check_judgement(rec)


def verify(run_dir, allow_missing_large: bool = False) -> list[str]:
    """Reasons the record at run_dir does not verify (empty: it does). allow_missing_large: accept a
    manifest-listed logits.npz that is absent (records committed to git leave it out)."""
    d = Path(run_dir)
    if not d.is_dir():
        return [f"{d} is not a directory"]
    rec = read_record(d)
    errors = _check_manifest(d, allow_missing_large, rec)[1]
    if rec.oracle is not None or member_kind(d, "oracle.json") is not None:
        return errors + _check_oracle(d, rec)
    if member_kind(d, REPRODUCTION_FILE) is not None:
        return errors + check_reproduction(d, rec)
    errors += rec.problem_lines(["params.json", "metadata.json", "perf.json", "verdict.json", "vram.json"])
    errors += _check_identity(d, rec)
    for name in BASE:  # the JSON members were read above, which reported any that is missing
        problem = None if name.endswith(".json") else _artifact_problem(d, name)
        errors += [problem] if problem else []
    kind = KINDS.get(kind_name(rec.params)) if rec.params is not None else None  # None: unknown (_check_judgement says so)
    if rec.perf is not None and rec.verdict is not None:
        errors += _check_phases(rec.perf, rec.verdict)
        if rec.perf.status("reference") == "ok" and kind is not None:
            for name in ("metrics.json", kind.logits_file):
                if not is_member_file(d, name) and not (allow_missing_large and name in LARGE):
                    errors.append(f"{name} is missing though the reference phase finished")
    errors += _check_vram(rec)
    errors += _check_judgement(rec)
    if rec.metrics is not None and kind is not None:
        errors += kind.fingerprint_problems(rec.metrics.figures())
    if rec.verdict is not None and rec.params is not None:
        errors += check_statements(d, rec, kind is None or kind.uses_thresholds)
    if is_member_file(d, "logits.npz"):
        from greta.checks.analyze import analyze_run

        rep = analyze_run(d)
        if rep["status"] != "OK":
            errors += [f"logits: {rep['status']}: {r}" for r in rep["reasons"]]
    return list(dict.fromkeys(errors))  # a file that is a FIFO is named once, not by each check that met it


def _check_phases(perf, verdict) -> list[str]:
    errors = []
    missing = [ph for ph in PHASES if ph not in perf.phases]
    if missing:
        return [f"perf.json lacks the phases {', '.join(missing)}"]
    status = [perf.status(ph) for ph in PHASES]
    v, failed = verdict.verdict, verdict.failed_phase
    if v == "INTERRUPTED" and failed == "analysis":  # the probe finished; the analysis notebooks were interrupted
        if any(s != "ok" for s in status):
            errors.append(f"INTERRUPTED during analysis but not every phase finished: {dict(zip(PHASES, status))}")
    elif v in FAULT_STATUS:
        if failed not in PHASES:
            return [f"{v} record names no failed phase"]
        i = PHASES.index(failed)
        if status[i] not in FAULT_STATUS[v]:
            errors.append(f"{v} but perf.json says {failed} ended with status {status[i]!r}")
        if any(s != "ok" for s in status[:i]):
            errors.append(f"phases before {failed} did not all finish: {status[:i]}")
        if any(s != "not_run" for s in status[i + 1:]):
            errors.append(f"phases after the failed {failed} have results: {status[i + 1:]}")
    elif v in JUDGED:
        if any(s != "ok" for s in status):
            errors.append(f"{v} but not every phase finished: {dict(zip(PHASES, status))}")
    else:
        errors.append(f"unknown verdict {v!r}")
    return errors
