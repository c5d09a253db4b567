"""Audit integrity on the CPU: the sealed manifest and `greta verify` (accepts complete records, rejects
tampered ones), interrupts (SIGINT, SIGTERM) leave an INTERRUPTED record and no orphan worker, an
unwritable or full output folder stops the run before it starts, and the same probe twice gives the
same bits."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from greta.record import store as record
from greta.__main__ import main as cli
from greta.probe.runner import run_probe
from greta.record.store import seal
from greta.checks.verify import verify

from conftest import CPU_PARAMS, SMALL_PROBE, wait_for_phase


@pytest.fixture(scope="module")
def good(tmp_path_factory, small_params):
    """One passing record, run once; tests tamper with copies."""
    root = tmp_path_factory.mktemp("good")
    return Path(run_probe(small_params(), out_root=root, progress=False))


@pytest.fixture
def copy(good, tmp_path):
    d = tmp_path / good.name
    shutil.copytree(good, d)
    return d


def edit_json(path: Path, **changes):
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj, indent=2))


def test_a_complete_record_verifies(good, capsys):
    assert (good / "manifest.json").is_file()
    man = json.loads((good / "manifest.json").read_text())
    assert set(man["files"]) == {p.name for p in good.iterdir() if p.name != "manifest.json"}
    assert man["params"] == json.loads((good / "params.json").read_text())
    assert "commit" in man and "dirty" in man and man["versions"]["torch"]
    assert verify(good) == []
    assert cli(["verify", str(good)]) == 0
    assert capsys.readouterr().out.startswith("OK ")


def test_a_changed_metric_is_rejected(copy, capsys):
    edit_json(copy / "metrics.json", max_abs_diff=1.0)
    reasons = verify(copy)
    assert any("metrics.json changed after the record was sealed" in r for r in reasons), reasons
    assert any("stored metrics give FAIL_EQUIV" in r for r in reasons), reasons
    assert cli(["verify", str(copy)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_a_tampered_and_resealed_record_is_still_rejected(copy):
    # whoever reseals after editing gets past the hashes, not past the verdict check
    edit_json(copy / "metrics.json", max_abs_diff=1.0, top1_agreement=0.5)
    seal(copy)
    reasons = verify(copy)
    assert "verdict.json says PASS_EQUIV, but the stored metrics give FAIL_EQUIV" in reasons, reasons
    assert any(r.startswith("logits: INCOMPLETE") for r in reasons), "the logits disagree with metrics.json"
    assert not any("sha256" in r for r in reasons)


def test_a_deleted_file_is_rejected(copy):
    (copy / "vram_samples.csv").unlink()
    reasons = verify(copy)
    assert "vram_samples.csv is listed in the manifest but missing" in reasons
    assert "vram_samples.csv is missing" in reasons


def test_changed_logits_are_rejected_even_when_resealed(copy, capsys):
    import numpy as np

    z = dict(np.load(copy / "logits.npz"))
    z["decode"][1, 3] += 0.5
    np.savez_compressed(copy / "logits.npz", **z)
    seal(copy)
    reasons = verify(copy)
    assert reasons and all(r.startswith("logits: INCOMPLETE") for r in reasons), reasons
    assert cli(["analyze", str(copy)]) == 1
    assert capsys.readouterr().out.startswith("INCOMPLETE")


def test_missing_logits_only_with_the_flag(copy):
    (copy / "logits.npz").unlink()
    assert "logits.npz is listed in the manifest but missing" in verify(copy)
    assert verify(copy, allow_missing_large=True) == []


def test_edited_params_and_added_files_are_rejected(copy):
    edit_json(copy / "params.json", seed=7)
    (copy / "notes.txt").write_text("added later")
    reasons = verify(copy)
    assert "params.json differs from the params in the manifest" in reasons
    assert any(r.startswith("metadata.json seed=0 but params.json seed=7") for r in reasons), reasons
    assert "notes.txt is not in the manifest (added after sealing)" in reasons


def test_an_unsealed_or_half_record_is_rejected(copy, tmp_path):
    (copy / "manifest.json").unlink()
    assert "manifest.json is missing" in verify(copy)
    assert verify(tmp_path / "nope") == [f"{tmp_path / 'nope'} is not a directory"]


def test_a_below_floor_peak_is_rejected(copy):
    vs = json.loads((copy / "vram.json").read_text())
    edit_json(copy / "vram.json", peak_vram_mb=vs["floor"]["total_mb"] / 2)
    seal(copy)
    assert any("below the analytic floor" in r for r in verify(copy))


# --- interrupts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,how", [(signal.SIGINT, "SIGINT (Ctrl-C)"), (signal.SIGTERM, "SIGTERM")])
def test_interrupt_leaves_an_interrupted_record_and_no_orphan(tmp_path, sig, how):
    args = [f"-p{k}={v}" for k, v in SMALL_PROBE.items()]
    proc = subprocess.Popen([sys.executable, "-m", "greta", "probe", "-f", str(CPU_PARAMS), *args,
                             "-p", "fault=hang:decode", "-o", str(tmp_path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    perf = wait_for_phase(tmp_path, "decode")  # until the worker hangs in decode
    assert perf and perf["decode"]["status"] == "running"
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith(f"greta: INTERRUPTED by {how}; record: ")
    d = next(tmp_path.glob("*/*/*/perf.json")).parent
    v = json.loads((d / "verdict.json").read_text())
    assert v["verdict"] == "INTERRUPTED" and v["failed_phase"] == "decode" and how in v["reason"]
    assert json.loads((d / "perf.json").read_text())["decode"]["status"] == "interrupted"
    assert verify(d) == []
    psutil.wait_procs(workers, timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


# --- the output folder ---------------------------------------------------------------------------------
def test_unwritable_output_folder_stops_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli(["probe", "-f", str(CPU_PARAMS), "-o", str(blocker / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not writable" in err and "-o" in err
    assert list(tmp_path.iterdir()) == [blocker]


def test_full_disk_stops_before_the_run(tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(record.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    assert cli(["audit", "-f", str(CPU_PARAMS), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MiB free" in err
    assert [p for p in (tmp_path / "out").rglob("*") if not p.name.startswith(".")] == []


# --- determinism -----------------------------------------------------------------------------------------
def test_the_same_probe_twice_gives_the_same_bits(good, small_params, tmp_path):
    again = Path(run_probe(small_params(), out_root=tmp_path, progress=False))
    a, b = np.load(good / "logits.npz"), np.load(again / "logits.npz")
    for k in ("decode", "reference", "tokens", "positions"):
        assert a[k].tobytes() == b[k].tobytes(), k
    for name in ("metrics.json", "verdict.json"):
        assert json.loads((good / name).read_text()) == json.loads((again / name).read_text()), name
    assert os.path.getsize(good / "logits.npz") > 0


def test_disk_full_during_the_run_leaves_no_complete_looking_record(tmp_path, capsys, monkeypatch):
    import errno

    from greta.record import files

    real = files.atomic_write_bytes

    def full(path, data):
        if Path(path).name == "verdict.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(files, "atomic_write_bytes", full)
    args = [x for k, v in SMALL_PROBE.items() for x in ("-p", f"{k}={v}")]
    assert cli(["probe", "-f", str(CPU_PARAMS), *args, "-o", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "manifest.json" in err
    (d,) = [p.parent for p in tmp_path.glob("*/*/*/params.json")]
    assert not (d / "manifest.json").exists() and not (d / "verdict.json").exists()
    assert "manifest.json is missing" in verify(d)
    assert not list(d.glob(".*.tmp"))


# --- what report.md, the notebooks and the HTML pages state (issue 15 #4) -------------------------------------
def _forge_failing_logits(d: Path):
    """Rewrite logits.npz so the decode path disagrees, recompute metrics.json and verdict.json from it
    honestly, and reseal: every data file is consistent, only report.md still tells the old story."""
    from greta.record.metrics import compare, equivalence_verdict
    from greta.record.params import Params
    from greta.record.store import verdict_record

    params = json.loads((d / "params.json").read_text())
    z = dict(np.load(d / "logits.npz"))
    z["decode"] = z["decode"] + np.float32(3.0) * (np.arange(z["decode"].shape[1], dtype=np.float32) % 7)
    np.savez_compressed(d / "logits.npz", **z)
    old = json.loads((d / "metrics.json").read_text())
    m = compare(z["decode"], z["reference"], z["tokens"].tolist(), z["positions"].tolist(),
                [r["source"] for r in old["per_position"]])
    v, reason = equivalence_verdict(m, params["kv_aligned"], params["thresholds"])
    (d / "metrics.json").write_text(json.dumps(m, indent=2))
    (d / "verdict.json").write_text(json.dumps(verdict_record(Params.from_dict(params), v, reason, None, m,
                                                              z["tokens"].tolist())))
    seal(d)
    return v


def test_a_forged_trace_resealed_under_an_old_report_is_rejected(copy):
    v = _forge_failing_logits(copy)
    assert v == "FAIL_EQUIV"
    from greta.checks.analyze import analyze_run

    assert analyze_run(copy)["status"] == "OK"  # the data files agree with each other: only the report can tell
    reasons = verify(copy)
    assert any(r.startswith("report.md is not what the record's data files render to (line ") for r in reasons), reasons


def test_a_report_edited_after_sealing_and_resealed_is_rejected(copy):
    text = (copy / "report.md").read_text()
    (copy / "report.md").write_text(text.replace("Verdict: **PASS_EQUIV**", "Verdict: **FAIL_EQUIV**"))
    assert any("report.md changed after the record was sealed" in r for r in verify(copy))
    seal(copy)
    line = text.splitlines().index(next(ln for ln in text.splitlines() if ln.startswith("Verdict: **"))) + 1
    assert verify(copy) == [f"report.md is not what the record's data files render to (line {line} differs): it "
                            "states something the data does not say"]


@pytest.mark.parametrize("old, new", [
    ("max_abs_diff ≤ ", "max_abs_diff ≤ 9"),
    ("Negative control (perturb): none", "Negative control (perturb): rope_offset"),
    ("bit_exact: **True**", "bit_exact: **False**"),
    ("Verdict: **PASS_EQUIV**", "Verdict: PASS_EQUIV"),
    ("## Provenance", "<!-- -->## Provenance"),  # anything at all, even what a reader never sees
    ("## Provenance", "## Provenance\u200b"),
])
def test_every_byte_of_the_report_is_checked(copy, old, new):
    text = (copy / "report.md").read_text()
    assert old in text, "the report's wording changed: update this test"
    (copy / "report.md").write_text(text.replace(old, new, 1))
    seal(copy)
    reasons = verify(copy)
    assert len(reasons) == 1 and reasons[0].startswith("report.md is not what the record's data files render to"), reasons


def test_every_page_and_notebook_states_the_records_verdict_by_its_mark(copy):
    """What a page's text says is not read (a user string can say anything); its mark is."""
    from greta.reports.verdict_marks import VERDICT_MIME, page_head

    nb = {"cells": [{"cell_type": "code", "source": "print(v)", "outputs": [
        {"output_type": "display_data", "data": {"text/markdown": ["Verdict: **FAIL\\_EQUIV** — a user string"],
                                                 VERDICT_MIME: {"verdict": "PASS_EQUIV"}}}]}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (copy / "extra_check.ipynb").write_text(json.dumps(nb))
    (copy / "extra_check.html").write_text(page_head("PASS_EQUIV") + "<p>Verdict: <strong>FAIL_EQUIV</strong></p>")
    seal(copy)
    assert verify(copy) == []  # the negative control: agreeing marks pass, whatever the text
    (copy / "extra_check.html").write_text(page_head("FAIL_EQUIV") + "<p>Verdict: <strong>PASS_EQUIV</strong></p>")
    nb["cells"][0]["outputs"][0]["data"][VERDICT_MIME] = {"verdict": "EXPECTED_DRIFT"}
    (copy / "extra_check.ipynb").write_text(json.dumps(nb))
    seal(copy)
    assert verify(copy) == ["extra_check.html states the verdict FAIL_EQUIV but verdict.json says PASS_EQUIV",
                            "extra_check.ipynb states the verdict EXPECTED_DRIFT but verdict.json says PASS_EQUIV"]
    (copy / "extra_check.html").write_text("<!DOCTYPE html>\n<p>Verdict: <strong>PASS_EQUIV</strong></p>")
    seal(copy)
    assert "extra_check.html carries no verdict mark in its head (<meta name=\"greta-verdict\">)" in verify(copy)


def test_a_keyed_seal_detects_a_reseal_without_the_key(copy, monkeypatch):
    monkeypatch.setenv("GRETA_SEAL_KEY", "k1")
    seal(copy)
    assert json.loads((copy / "manifest.json").read_text())["hmac"]
    assert verify(copy) == []
    monkeypatch.delenv("GRETA_SEAL_KEY")
    assert verify(copy) == []  # without the key the HMAC cannot be checked, and is not required
    seal(copy)  # a reseal by whoever lacks the key
    monkeypatch.setenv("GRETA_SEAL_KEY", "k1")
    assert verify(copy) == ["manifest.json carries no HMAC though GRETA_SEAL_KEY is set: it was sealed without the key"]
    monkeypatch.setenv("GRETA_SEAL_KEY", "other")
    seal(copy)
    monkeypatch.setenv("GRETA_SEAL_KEY", "k1")
    assert any("HMAC does not match" in r for r in verify(copy))
