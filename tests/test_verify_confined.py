"""`greta verify` and `greta analyze` stay inside the record and never stall (issue 24, rows D1 and D2).

A sealed CPU record is made once; each case changes a copy the way a hostile record would: FIFOs and
symlinks where files belong, manifest entries that point outside, symlinked directories, entries added after
sealing, a wrong `bytes`. The hanging cases run the CLI in a subprocess under a timeout, so a regression fails
the test instead of stalling the suite. The untouched copy verifies: the negative control of every refusal."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from greta.checks.analyze import analyze_run
from greta.checks.verify import verify
from greta.probe.runner import run_probe
from greta.record import members
from greta.record.files import read_record
from greta.record.store import seal
from greta.terminal import echo

from conftest import REPO_ROOT

TIMEOUT_S = 60  # verify of a small record takes a second or two; a stall is the bug


@pytest.fixture(scope="module")
def sealed(tmp_path_factory, small_params):
    root = tmp_path_factory.mktemp("sealed")
    return Path(run_probe(small_params(), out_root=root, progress=False))


@pytest.fixture
def rec(sealed, tmp_path):
    d = tmp_path / "rec" / sealed.name
    shutil.copytree(sealed, d, symlinks=True)
    return d


def cli(*args) -> tuple[int, str]:
    """`python -m greta <args>` in a subprocess: (exit code, stdout + stderr); fails the test on a stall."""
    try:
        p = subprocess.run([sys.executable, "-m", "greta", *map(str, args)], capture_output=True, text=True,
                           timeout=TIMEOUT_S, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"greta {' '.join(map(str, args))} did not end within {TIMEOUT_S} s (it blocked)")
    return p.returncode, p.stdout + p.stderr


def edit_manifest(d: Path, change):
    man = json.loads((d / "manifest.json").read_text())
    change(man["files"])
    (d / "manifest.json").write_text(json.dumps(man, indent=2))


def entry_of(path: Path) -> dict:
    data = Path(path).read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_the_untouched_copy_verifies(rec):
    assert verify(rec) == []
    assert cli("verify", rec)[0] == 0
    assert analyze_run(rec)["status"] == "OK"


# --- D1: special files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["report.md", "verdict.json"])
def test_a_fifo_in_place_of_a_member_fails_promptly(rec, name):
    (rec / name).unlink()
    os.mkfifo(rec / name)
    rc, out = cli("verify", rec)
    assert rc == 1 and out.startswith("FAIL"), out
    assert out.count(f"{name} is a FIFO, not a regular file") == 1, out  # named once, by whichever check met it


def test_an_extra_fifo_notebook_fails_promptly(rec):
    os.mkfifo(rec / "x.ipynb")
    rc, out = cli("verify", rec)
    assert rc == 1 and "x.ipynb is a FIFO not in the manifest" in out, out


def test_a_fifo_logits_file_does_not_stall_analyze(rec):
    (rec / "logits.npz").unlink()
    os.mkfifo(rec / "logits.npz")
    rc, out = cli("analyze", rec)
    assert rc == 1 and out.startswith("MISSING_LOGITS"), out
    assert "logits.npz cannot be read: is a FIFO" in out, out
    rc, out = cli("verify", rec)
    assert rc == 1 and "logits.npz is a FIFO, not a regular file" in out, out


def test_a_symlink_to_dev_zero_is_refused_not_read(rec):
    (rec / "report.md").unlink()
    (rec / "report.md").symlink_to("/dev/zero")
    rc, out = cli("verify", rec)
    assert rc == 1 and "report.md is a symlink, not a regular file" in out, out


def test_an_oversized_member_is_refused_unread(rec, monkeypatch):
    monkeypatch.setitem(members.CAPS, ".md", 100)  # report.md is a few kB
    reasons = verify(rec)
    assert any(r.startswith("report.md is ") and "over the 100 bytes a .md file may have" in r for r in reasons), reasons


# --- D2: outside the record ------------------------------------------------------------------------------
@pytest.mark.parametrize("outside", ["/etc/passwd", "../../../../../../etc/hostname"])
def test_manifest_entries_outside_the_record_are_refused(rec, outside):
    target = Path(outside) if outside.startswith("/") else (rec / outside).resolve()
    if not target.is_file():
        pytest.skip(f"{target} does not exist on this machine")
    edit_manifest(rec, lambda files: files.__setitem__(outside, entry_of(target)))  # its real sha256 and size
    reasons = verify(rec)
    assert any(r.startswith(f"manifest.json lists {outside!r}, which ") for r in reasons), reasons


@pytest.mark.parametrize("absolute", [False, True])
def test_an_outside_entry_is_never_opened(rec, tmp_path, absolute):
    # a FIFO outside the record, listed by a relative or an absolute path: opening it would block, so a
    # prompt FAIL shows verify never opened it
    os.mkfifo(tmp_path / "trap")
    name = str(tmp_path / "trap") if absolute else "../../trap"
    edit_manifest(rec, lambda files: files.__setitem__(name, {"sha256": "0" * 64, "bytes": 0}))
    rc, out = cli("verify", rec)
    why = "is an absolute path, outside the record" if absolute else "leaves the record directory"
    assert rc == 1 and f"manifest.json lists {echo(name)}, which {why}" in out, out


def test_a_symlinked_member_with_the_right_content_is_refused(rec, tmp_path):
    outside = tmp_path / "report.md"
    shutil.copy(rec / "report.md", outside)  # same bytes, same sha256
    (rec / "report.md").unlink()
    (rec / "report.md").symlink_to(outside)
    reasons = verify(rec)
    assert "report.md is a symlink, not a regular file: a record holds only regular files" in reasons, reasons


def test_a_symlinked_directory_is_not_entered(rec):
    if not Path("/etc/hostname").is_file():
        pytest.skip("no /etc/hostname")
    (rec / "etc").symlink_to("/etc")
    edit_manifest(rec, lambda files: files.__setitem__("etc/hostname", entry_of(Path("/etc/hostname"))))
    reasons = verify(rec)
    assert any(r.startswith("etc/hostname is not readable: etc is a symlink") for r in reasons), reasons
    assert members.member_kind(rec, "etc") == "symlink"


def test_a_symlinked_directory_unlisted_is_named(rec):
    (rec / "etc").symlink_to("/etc")
    assert "etc is a symlink not in the manifest: a record holds only the files its manifest lists" in verify(rec)


@pytest.mark.parametrize("make", ["dotfile", "dotdir", "emptydir", "file_in_dir"])
def test_entries_added_after_sealing_are_refused(rec, make):
    if make == "dotfile":
        (rec / ".notes").write_text("added later")
        want = ".notes is not in the manifest (added after sealing)"
    elif make == "dotdir":
        (rec / ".ipynb_checkpoints").mkdir()
        (rec / ".ipynb_checkpoints" / "report-checkpoint.md").write_text("x")
        want = ".ipynb_checkpoints is a directory not in the manifest"
    elif make == "emptydir":
        (rec / "extra").mkdir()
        want = "extra is a directory not in the manifest"
    else:
        (rec / "extra").mkdir()
        (rec / "extra" / "x.txt").write_text("x")
        want = "extra is a directory not in the manifest"
    reasons = verify(rec)
    assert any(r.startswith(want) for r in reasons), reasons
    assert len([r for r in reasons if "not in the manifest" in r]) == 1, "one line per unlisted entry, not its contents"


def test_a_deep_tree_is_listed_not_followed_to_the_bottom(rec):
    d = rec / "deep"
    for i in range(members.MAX_DEPTH + 40):  # deeper than the walk enters: it must neither recurse nor crash
        d = d / "d"
    d.mkdir(parents=True)
    (d / "x.txt").write_text("x")
    assert [r for r in verify(rec) if "not in the manifest" in r] == [
        "deep is a directory not in the manifest: a record holds only the files its manifest lists"]


def test_many_unlisted_entries_are_counted_past_twenty(rec):
    for i in range(30):
        (rec / f".junk{i:02d}").write_text("x")
    unlisted = [r for r in verify(rec) if "not in the manifest" in r]
    assert len(unlisted) == 21 and unlisted[-1] == "... and 10 more entries not in the manifest"


def test_a_wrong_bytes_count_is_refused(rec):
    def grow(files):
        files["report.md"]["bytes"] += 1

    edit_manifest(rec, grow)
    size = (rec / "report.md").stat().st_size
    assert f"report.md changed after the record was sealed ({size} bytes, the manifest says {size + 1})" in verify(rec)


def test_a_manifest_entry_without_bytes_is_refused(rec):
    edit_manifest(rec, lambda files: files["report.md"].pop("bytes"))
    assert any(r.startswith("manifest.json's entry for report.md is not") for r in verify(rec))


def test_a_file_in_a_listed_subdirectory_verifies(rec):
    # the rule is about what the manifest lists, not about depth: a sealed subdirectory is part of the record
    (rec / "extra").mkdir()
    (rec / "extra" / "x.txt").write_text("x")
    seal(rec)
    assert verify(rec) == []


def test_read_record_refuses_special_and_linked_files(rec, tmp_path):
    (rec / "verdict.json").unlink()
    os.mkfifo(rec / "verdict.json")
    shutil.copy(rec / "metrics.json", tmp_path / "metrics.json")
    (rec / "metrics.json").unlink()
    (rec / "metrics.json").symlink_to(tmp_path / "metrics.json")
    r = read_record(rec)
    assert r.verdict is None and r.metrics is None
    assert r.problems["verdict.json"] == "verdict.json is a FIFO, not a regular file: a record holds only regular files"
    assert r.problems["metrics.json"].startswith("metrics.json is a symlink")


def test_analyze_refuses_a_symlinked_logits_file(rec, tmp_path):
    shutil.move(rec / "logits.npz", tmp_path / "logits.npz")
    (rec / "logits.npz").symlink_to(tmp_path / "logits.npz")
    rep = analyze_run(rec)
    assert rep["status"] == "MISSING_LOGITS"
    assert "logits.npz cannot be read: is a symlink, not a regular file" in rep["reasons"][0], rep["reasons"]


@pytest.mark.parametrize("name,why", [("/etc/passwd", "absolute"), ("../x", "leaves"), ("a/../b", "leaves"),
                                      ("./a", "leaves"), ("a//b", "leaves"), ("a\0b", "NUL"), ("", "not a file name"),
                                      (7, "not a file name"), ("a/" * 3000, "longer than a path")])
def test_name_problem(name, why):
    assert why in members.name_problem(name)


@pytest.mark.parametrize("name", ["report.md", "sub/dir/x.png", "..x", "x..", ".hidden"])
def test_plain_names_are_accepted(name):
    assert members.name_problem(name) is None
