"""The record's files as types (docs/RECORD.md), and the one reader of a record's JSON files.

Each type has a format version: `format` in its file, where a file without the key is format 1 (the
layout of every record so far, so format-1 files are written without it; manifest.json has always stated
it). `from_dict` is tolerant (keys a type does not name are kept in `extra`, so a file read and written
again is unchanged; a format newer than this greta reads is refused in one line) and `to_dict` writes it
back. params.json is greta.record.params' own type; oracle.json is read as a plain dict.

    rec = read_record(run_dir)          # every file typed; rec.problems: one line per unreadable file
    read_member_json(run_dir, name)     # one JSON file of a record, through greta.record.members' safe reader
    rec.verdict.verdict, rec.metrics.max_abs_diff, rec.manifest.files

Writing is atomic (a temp file renamed over the target), so no file is ever half-written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from greta.record.members import MemberError, read_member

MANIFEST = "manifest.json"


class RecordFileError(ValueError):
    """A record file that cannot be read as its type; the message is one line naming the file. `detail`:
    the message without the file's name (for callers that phrase the finding their own way)."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail if detail is not None else message


# --- writing ------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes):
    """Write to a temp file beside path, then rename: a reader sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(3)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk: named by the file it could not write, not the temp file
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(x):
    """json.dumps' default: a typed value (Params and its sections) by its to_dict(), numpy scalars and arrays
    as Python numbers and lists, anything else as str."""
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def write_json(path: Path, obj) -> Path:
    """obj (a dict, or a record file type) as indented JSON, atomically."""
    if isinstance(obj, RecordFile):
        obj = obj.to_dict()
    atomic_write_text(path, json.dumps(obj, indent=2, default=jsonable) + "\n")
    return Path(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- reading ------------------------------------------------------------------------------------
def read_json_obj(path) -> dict:
    """The JSON object in path; FileNotFoundError when absent, RecordFileError (one line) when unreadable,
    invalid JSON or not an object."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _unreadable(path.name, e) from None
    return _json_obj(raw, path.name)


def read_member_json(run_dir, name: str) -> dict:
    """The JSON object in the record member name, read through greta.record.members (inside the record, a
    regular file, within its size cap); FileNotFoundError when absent, RecordFileError (one line) otherwise."""
    try:
        raw = read_member(run_dir, name)
    except MemberError as e:
        raise RecordFileError(str(e), e.detail) from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _unreadable(name, e) from None
    return _json_obj(raw, name)


def _unreadable(name: str, e: Exception) -> RecordFileError:
    first = str(e).splitlines()[0] if str(e) else ""
    detail = f"{type(e).__name__}: {first}"
    return RecordFileError(f"{name} is unreadable: {detail}", detail)


def _json_obj(raw: bytes, name: str) -> dict:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
        raise _unreadable(name, e) from None
    if not isinstance(obj, dict):
        raise RecordFileError(f"{name} is not a JSON object (got {type(obj).__name__})")
    return obj


def read_json_opt(path) -> dict | None:
    """The JSON object in path, or None when it is missing, unreadable or not an object (for renderers
    that draw what they can)."""
    try:
        return read_json_obj(path)
    except (OSError, RecordFileError):
        return None


@dataclass
class RecordFile:
    """Base of the record's JSON files: declared fields, `format`, and `extra` for keys not declared."""
    NAME: ClassVar[str] = ""
    FORMAT: ClassVar[int] = 1
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    ALWAYS_STATE_FORMAT: ClassVar[bool] = False  # manifest.json has always said "format": 1

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise RecordFileError(f"{cls.NAME} is not a JSON object (got {type(d).__name__})")
        lacking = [k for k in cls.REQUIRED if k not in d]
        if lacking:
            raise RecordFileError(f"{cls.NAME} lacks the key(s) {', '.join(lacking)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        known.setdefault("format", 1)  # records written before the files carried a version
        if not isinstance(known["format"], int) or known["format"] > cls.FORMAT:
            raise RecordFileError(f"{cls.NAME} has format {known['format']!r}; this greta reads format <= "
                                  f"{cls.FORMAT}: update greta")
        obj = cls(**known, extra={k: v for k, v in d.items() if k not in names})
        obj._absent = frozenset(names - set(d) - {"format"})  # an older file lacks them: written back without
        return obj

    def to_dict(self) -> dict:
        absent = getattr(self, "_absent", frozenset())
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in absent and f.name != "extra"}
        if out.get("format") == 1 and not self.ALWAYS_STATE_FORMAT:
            del out["format"]  # format 1 is the layout written before the key existed: its files lack it
        out.update(self.extra)
        return out

    @classmethod
    def read(cls, run_dir):
        return cls.from_dict(read_json_obj(Path(run_dir) / cls.NAME))


@dataclass
class Metadata(RecordFile):
    NAME: ClassVar[str] = "metadata.json"
    format: int = 1
    run_id: str | None = None
    probe: str | None = None
    commit: str | None = None
    dirty: bool | None = None
    host: str | None = None
    seed: int | None = None
    model: str | None = None
    started_utc: str | None = None
    finished_utc: str | None = None
    device_name: str | None = None
    model_hash: str | None = None
    weights_source: str | None = None
    prompt: dict | None = None
    continuation: dict | None = None  # each path's tokens decoded (greta.probe.continuation); absent before it existed
    worker_pid: int | None = None
    # how the record's human-readable files state its data (greta.checks.statements): STATEMENTS_FORMAT, or
    # None in records made before (their report.md came from an earlier renderer; checked by the legacy rules)
    statements: int | None = None
    extra: dict = field(default_factory=dict)


# 1: report.md is exactly what this checkout's renderer makes of the record's data files, every page carries
# its verdict's mark and every notebook its outputs' (greta.reports.verdict_marks). A change to what a report
# renderer writes makes the records before it unlike a re-render: bump this, and verify reads those by the
# legacy rules.
STATEMENTS_FORMAT = 1


@dataclass
class PhasePerf(RecordFile):
    """One phase of perf.json: status (ok, timeout, oom, error, crash, interrupted, not_run, running) and
    whatever figures the phase has (wall_s, timeout_s, runner_wall_s, max_rss_mb, allocator, error...),
    kept as written: a phase carries no format of its own (perf.json does)."""
    NAME: ClassVar[str] = "perf.json phase"
    REQUIRED: ClassVar[tuple[str, ...]] = ("status",)
    status: str = "not_run"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict) or "status" not in d:
            raise RecordFileError(f"perf.json has a phase without a status: {str(d)[:80]}")
        return cls(status=d["status"], extra={k: v for k, v in d.items() if k != "status"})

    def to_dict(self) -> dict:
        return {"status": self.status, **self.extra}

    @property
    def wall_s(self) -> float | None:
        return self.extra.get("wall_s")

    @property
    def timeout_s(self) -> float | None:
        return self.extra.get("timeout_s")


@dataclass
class Perf(RecordFile):
    """perf.json: one PhasePerf per phase, plus the roofline; any other key (e.g. ceilings) stays in extra."""
    NAME: ClassVar[str] = "perf.json"
    format: int = 1
    phases: dict = field(default_factory=dict)  # phase name -> PhasePerf
    roofline: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict):
        from greta.record.params import PHASES

        if not isinstance(d, dict):
            raise RecordFileError(f"{cls.NAME} is not a JSON object (got {type(d).__name__})")
        phases = {ph: PhasePerf.from_dict(d[ph]) for ph in PHASES if isinstance(d.get(ph), dict)}
        rest = {k: v for k, v in d.items() if k not in phases}
        return RecordFile.from_dict.__func__(cls, {"phases": phases, **rest})

    def to_dict(self) -> dict:
        out = {} if self.format == 1 else {"format": self.format}  # see RecordFile.to_dict
        out.update({ph: p.to_dict() for ph, p in self.phases.items()})
        if self.roofline is not None:
            out["roofline"] = self.roofline
        out.update(self.extra)
        return out

    def status(self, phase: str) -> str | None:
        p = self.phases.get(phase)
        return p.status if p else None


@dataclass
class Metrics(RecordFile):
    """metrics.json: greta.record.metrics.compare's dict. Keys are checked by their users (analyze names
    the lacking ones), so none is required here."""
    NAME: ClassVar[str] = "metrics.json"
    format: int = 1
    span: int | None = None
    vocab: int | None = None
    finite: bool | None = None
    max_abs_diff: float | None = None
    p99_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    top1_agreement: float | None = None
    cosine_min: float | None = None
    cosine_mean: float | None = None
    first_argmax_mismatch: int | None = None
    bit_exact: bool | None = None
    tokens_agree: bool | None = None
    distinct_argmax: int | None = None
    per_position: list | None = None
    extra: dict = field(default_factory=dict)

    def figures(self) -> dict:
        """The dict greta.record.metrics works on (equivalence_verdict): the file's keys without its format."""
        return {k: v for k, v in self.to_dict().items() if k != "format"}


@dataclass
class VramSummary(RecordFile):
    NAME: ClassVar[str] = "vram.json"
    format: int = 1
    backend: str | None = None
    fallback_reason: str | None = None
    device_info: str | None = None
    sampling_period_sec: float | None = None
    samples_count: int | None = None
    peak_vram_mb: float | None = None
    peak_timestamp_offset_sec: float | None = None
    allocator_peaks: dict = field(default_factory=dict)
    floor: dict = field(default_factory=dict)
    floor_applies: bool = True
    below_floor: bool = False
    below_floor_figures: list = field(default_factory=list)
    phases: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class Verdict(RecordFile):
    NAME: ClassVar[str] = "verdict.json"
    REQUIRED: ClassVar[tuple[str, ...]] = ("verdict",)
    format: int = 1
    verdict: str = ""
    reason: str = ""
    failed_phase: str | None = None
    bit_exact: bool | None = None
    kv_aligned: int | None = None
    perturb: str | None = None
    tokens: list | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Manifest(RecordFile):
    """manifest.json, the seal: sha256 and size of every other file. `hmac`: HMAC-SHA256 of the rest
    (greta.record.store.seal, when GRETA_SEAL_KEY is set), else None."""
    NAME: ClassVar[str] = MANIFEST
    REQUIRED: ClassVar[tuple[str, ...]] = ("files",)
    ALWAYS_STATE_FORMAT: ClassVar[bool] = True
    format: int = 1
    run_id: str | None = None
    sealed_utc: str | None = None
    params: dict | None = None
    commit: str | None = None
    dirty: bool | None = None
    versions: dict | None = None
    files: dict = field(default_factory=dict)  # name -> {"sha256", "bytes"}
    hmac: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if "hmac" in out and out["hmac"] is None:
            del out["hmac"]
        return out


TYPES = {t.NAME: t for t in (Metadata, Perf, Metrics, VramSummary, Verdict, Manifest)}


@dataclass
class RecordFiles:
    """A record's files as read_record found them: each typed, or None (absent or unreadable); params.json
    and oracle.json as plain dicts; problems: file name -> one line, for each one absent or unreadable."""
    run_dir: Path
    params: dict | None = None
    metadata: Metadata | None = None
    perf: Perf | None = None
    metrics: Metrics | None = None
    vram: VramSummary | None = None
    verdict: Verdict | None = None
    manifest: Manifest | None = None
    oracle: dict | None = None
    problems: dict = field(default_factory=dict)

    def problem_lines(self, names=None) -> list[str]:
        """The problems of the named files (all by default), one line each."""
        return [line for name, line in self.problems.items() if names is None or name in names]


_ATTR = {"params.json": "params", "oracle.json": "oracle", "metadata.json": "metadata", "perf.json": "perf",
         "metrics.json": "metrics", "vram.json": "vram", "verdict.json": "verdict", MANIFEST: "manifest"}


def read_record(run_dir) -> RecordFiles:
    """Every JSON file of the record at run_dir, typed, each read through greta.record.members (never a
    symlink, FIFO or device, never past its size cap). Never raises for a bad file: it is None and `problems`
    says why in one line ("X is missing", "X is unreadable: ...", "X is a FIFO, not a regular file ...")."""
    d = Path(run_dir)
    rec = RecordFiles(run_dir=d)
    for name, attr in _ATTR.items():
        try:
            obj = read_member_json(d, name)
            value = TYPES[name].from_dict(obj) if name in TYPES else obj
        except FileNotFoundError:
            rec.problems[name] = f"{name} is missing"
            continue
        except (OSError, RecordFileError) as e:
            rec.problems[name] = str(e) if isinstance(e, RecordFileError) else f"{name} is unreadable: {e}"
            continue
        setattr(rec, attr, value)
    return rec
