"""One allocator of run directories, for probe records, audits, oracle records and sweeps alike:

    allocate_run_dir(out_root, "b3_77", [model, f"ctx{ctx}", f"kv{k}"])
      -> <out_root>/<YYYY-MM-DD>/b3_77/<HHMMSS>-<model>-ctx<ctx>-kv<k>-<4 hex>/   (created, empty)

The directory is created with mkdir(exist_ok=False), so two runs never share one and no record is ever
overwritten; on a collision the name gets a new random suffix. The name is safe and bounded (run_stem: only
[A-Za-z0-9._+=-], at most MAX_STEM characters before the suffix, a hash of the full name past the cut), and a
root inside an existing record is refused (records are never nested). The default out_root, "outputs", is the
checkout's outputs/ folder whatever the current directory; any other relative path is the caller's.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

from greta.paths import OUTPUTS
from greta.terminal import echo

DEFAULT_OUT_ROOT = "outputs"
ATTEMPTS = 16
MAX_PART = 48  # characters of one part (a model's name): the ctx and kv parts after it stay readable
MAX_STEM = 96  # characters of <HHMMSS>-<parts>; with "-<4 hex>" a run id stays far below any NAME_MAX (255)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
MARKER = "manifest.json"
UNSEALED_MARKERS = ("params.json", "metadata.json")


def resolve_out_root(out_root=DEFAULT_OUT_ROOT) -> Path:
    """The folder records go under: the checkout's outputs/ for the default, else out_root as given."""
    if out_root is None or str(out_root) == DEFAULT_OUT_ROOT:
        return Path(OUTPUTS)
    return Path(out_root)


def _bounded(s: str, limit: int, whole: str) -> str:
    """s cut to limit characters, ending in "~" and 8 hex of the sha256 of `whole` (the text as given), so
    two long names that differ only past the cut still differ."""
    if len(s) <= limit:
        return s
    digest = hashlib.sha256(whole.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{s[:limit - 9].rstrip('-_.')}~{digest}"


def _part(x) -> str:
    """One name part: a path's last component (a model given as a checkpoint path), in safe characters, at
    most MAX_PART of them."""
    s = Path(str(x)).name or str(x)
    return _bounded(_UNSAFE.sub("_", s).strip("_") or "x", MAX_PART, str(x))


def run_stem(now: datetime, name_parts) -> str:
    """<HHMMSS>-<parts>: only [A-Za-z0-9._+=-] (any other run of characters is one "_"); each part at most
    MAX_PART characters and the whole at most MAX_STEM, a cut one ending in a hash of what was given."""
    stem = "-".join([now.strftime("%H%M%S"), *(_part(p) for p in name_parts)])
    return _bounded(stem, MAX_STEM, "\0".join(map(str, name_parts)))


def enclosing_record(path) -> Path | None:
    """The record directory that path is, or lies inside (a folder holding manifest.json, or params.json and
    metadata.json), or None. Records are never nested: a record inside another changes the outer one's files."""
    p = Path(path).absolute()
    for d in (p, *p.parents):
        try:
            if (d / MARKER).is_file() or all((d / n).is_file() for n in UNSEALED_MARKERS):
                return d
        except OSError:  # e.g. a name too long: not a record
            continue
    return None


def allocate_run_dir(out_root, kind: str, name_parts, now: datetime | None = None) -> Path:
    """Create and return a new, empty run directory <root>/<day>/<kind>/<HHMMSS>-<parts>-<4 hex>/. Refuses
    (NestedRecordError) a root inside a record; on an OSError removes the day and kind folders it made."""
    now = now or datetime.now(timezone.utc)
    root = resolve_out_root(out_root)
    outer = enclosing_record(root)
    if outer is not None:
        raise NestedRecordError(nested_message(root, outer))
    parent = root / now.strftime("%Y-%m-%d") / kind
    made = [d for d in (parent.parent, parent) if not d.exists()]
    stem = run_stem(now, name_parts)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for _ in range(ATTEMPTS):
            d = parent / f"{stem}-{secrets.token_hex(2)}"
            try:
                d.mkdir(exist_ok=False)
            except FileExistsError:
                continue  # another run took this name in the same second: draw a new suffix
            return d
    except OSError:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if still empty: another run may have put its record there meanwhile
        raise
    raise FileExistsError(f"could not allocate a new run directory under {parent} after {ATTEMPTS} tries: "
                          "clear out stale directories named like "
                          f"{stem}-*")


class NestedRecordError(ValueError):
    """An output folder inside an existing record; one line naming both."""


def nested_message(root, outer: Path) -> str:
    return (f"-o {echo(str(root))} lies inside the record {echo(str(outer))}: a record is never written inside "
            "another (it would no longer verify); pass -o <a folder outside any record>, e.g. -o outputs")
