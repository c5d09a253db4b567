"""The committed record store (outputs/): only the records outputs/README.md cites as current are in the tree,
each sealed, under 15 MB in all, and local runs stay out of `git status`."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "outputs"
pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs a git checkout")


def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def committed_records() -> set[str]:
    """<day>/<probe>/<run-id> of every record directory git tracks under outputs/."""
    files = git("ls-files", "outputs").split()
    return {"/".join(Path(f).parts[1:4]) for f in files if len(Path(f).parts) > 4}


def current_section() -> str:
    text = (OUT / "README.md").read_text()
    return text.split("## Superseded", 1)[0]


def test_every_committed_record_is_cited_as_current_and_sealed():
    records = committed_records()
    assert records, "no committed records at all"
    cited = current_section()
    for r in records:
        assert r.split("/")[-1] in cited, f"outputs/{r} is committed but outputs/README.md does not cite it as current"
        d = OUT / r
        if (d / "sweep_verdict.json").is_file():  # a sweep: each point is its own sealed record
            points = [p.parent for p in d.rglob("params.json")]
            assert points and all((p / "manifest.json").is_file() for p in points), f"outputs/{r}: unsealed points"
        else:
            assert (d / "manifest.json").is_file(), f"outputs/{r} is committed without a seal (manifest.json)"


def test_every_record_cited_as_current_is_committed():
    cited = set(re.findall(r"`(\d{4}-\d\d-\d\d/[\w.-]+/[\w.-]+)`", current_section()))
    assert cited, "outputs/README.md cites no record"
    missing = cited - committed_records()
    assert not missing, f"cited as current but not in the tree: {sorted(missing)}"


def test_committed_outputs_are_under_15_mb():
    total = sum((ROOT / f).stat().st_size for f in git("ls-files", "outputs").split() if (ROOT / f).is_file())
    assert total <= 15 * 2**20, f"committed outputs hold {total / 2**20:.1f} MiB (limit 15)"


def test_local_runs_are_ignored_and_the_readme_is_not():
    day = sorted(p.name for p in OUT.iterdir() if p.is_dir())[0]
    local = f"outputs/{day}/b3_77/999999-tiny-ctx256-kv1-abcd/report.md"
    assert git("check-ignore", local).strip() == local
    r = subprocess.run(["git", "check-ignore", "outputs/README.md"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1, "outputs/README.md must not be ignored"
