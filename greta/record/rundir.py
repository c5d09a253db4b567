"""One allocator of run directories, for probe records, audits, oracle records and sweeps alike:

    allocate_run_dir(out_root, "b3_77", [model, f"ctx{ctx}", f"kv{k}"])
      -> <out_root>/<YYYY-MM-DD>/b3_77/<HHMMSS>-<model>-ctx<ctx>-kv<k>-<4 hex>/   (created, empty)

The directory is created with mkdir(exist_ok=False), so two runs never share one and no record is ever
overwritten; on a collision the name gets a new random suffix. The default out_root, "outputs", is the
checkout's outputs/ folder whatever the current directory; any other relative path is the caller's.
"""
from __future__ import annotations

import secrets
from datetime import datetime, timezone
from pathlib import Path

from greta.paths import OUTPUTS

DEFAULT_OUT_ROOT = "outputs"
ATTEMPTS = 16


def resolve_out_root(out_root=DEFAULT_OUT_ROOT) -> Path:
    """The folder records go under: the checkout's outputs/ for the default, else out_root as given."""
    if out_root is None or str(out_root) == DEFAULT_OUT_ROOT:
        return Path(OUTPUTS)
    return Path(out_root)


def _part(x) -> str:
    """One name part: a path's last component (a model given as a checkpoint path), no separators."""
    s = Path(str(x)).name or str(x)
    return s.replace("/", "_").replace("\\", "_") or "x"


def allocate_run_dir(out_root, kind: str, name_parts, now: datetime | None = None) -> Path:
    """Create and return a new, empty run directory <root>/<day>/<kind>/<HHMMSS>-<parts>-<4 hex>/."""
    now = now or datetime.now(timezone.utc)
    parent = resolve_out_root(out_root) / now.strftime("%Y-%m-%d") / kind
    parent.mkdir(parents=True, exist_ok=True)
    stem = "-".join([now.strftime("%H%M%S"), *(_part(p) for p in name_parts)])
    for _ in range(ATTEMPTS):
        d = parent / f"{stem}-{secrets.token_hex(2)}"
        try:
            d.mkdir(exist_ok=False)
        except FileExistsError:
            continue  # another run took this name in the same second: draw a new suffix
        return d
    raise FileExistsError(f"could not allocate a new run directory under {parent} after {ATTEMPTS} tries: "
                          "clear out stale directories named like "
                          f"{stem}-*")
