"""Fingerprints of the logits in metrics.json (greta.record.fingerprints, issue 24 item 2): verify holds
bit_exact against them without logits.npz, and a one-ulp difference shows in the hashes."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from greta.checks.analyze import analyze_run
from greta.checks.statements import rendered_report
from greta.checks.verify import verify
from greta.record.files import read_record
from greta.probe.runner import run_probe
from greta.record.fingerprints import TOP_K, problems, row_fingerprint
from greta.record.metrics import compare
from greta.record.store import seal

SOURCES = ["prefill", "decode", "decode", "decode"]


def _logits(seed=0):
    d = np.random.default_rng(seed).standard_normal((4, 300)).astype(np.float32)
    return d, d.copy()


def _compare(d, r):
    return compare(d, r, [0] * 4, [99, 100, 101, 102], SOURCES)


def test_equal_logits_have_equal_hashes_and_agree_with_bit_exact():
    m = _compare(*_logits())
    assert m["bit_exact"] and problems(m) == []
    for row in m["per_position"]:
        fp = row["fingerprint"]
        assert set(fp) == {row["source"], "reference"}
        assert fp[row["source"]] == fp["reference"] and len(fp["reference"]["top_ids"]) == TOP_K


def test_one_ulp_shows_in_the_hash_of_that_position_only():
    d, r = _logits()
    r[2, 7] = np.nextafter(r[2, 7], np.float32(np.inf))
    m = _compare(d, r)
    assert not m["bit_exact"] and problems(m) == []
    same = [row["fingerprint"][row["source"]]["sha256"] == row["fingerprint"]["reference"]["sha256"]
            for row in m["per_position"]]
    assert same == [True, True, False, True]


@pytest.mark.parametrize("claim", [True, False])
def test_a_bit_exact_that_contradicts_the_hashes_is_named(claim):
    d, r = _logits()
    if claim:
        r[1, 0] += 1e-3  # the paths differ, the record says they do not
    m = _compare(d, r)
    m["bit_exact"] = claim
    (reason,) = problems(m)
    assert reason.startswith(f"metrics.json bit_exact is {claim} but the fingerprints say")


def test_stored_argmaxes_and_agreement_are_held_against_the_top_ids():
    m = _compare(*_logits())
    m["per_position"][3]["argmax_reference"] += 1
    m["top1_agreement"] = 0.75
    got = problems(m)
    assert "metrics.json step 3: the stored argmaxes are not the fingerprints' top-1 ids" in got
    assert any(r.startswith("metrics.json top1_agreement is 0.75 but the fingerprints' top-1 ids agree at 4 of 4") for r in got)


def test_a_record_without_fingerprints_is_not_held_to_them():
    m = _compare(*_logits())
    for row in m["per_position"]:
        del row["fingerprint"]
    m["bit_exact"] = False
    assert problems(m) == []


def test_top_ids_break_ties_as_argmax_does():
    row = np.array([1.0, 3.0, 3.0, -0.0, 0.0, 2.0], dtype=np.float32)
    fp = row_fingerprint(row, k=6)
    assert fp["top_ids"] == [1, 2, 5, 0, 3, 4] and fp["top_ids"][0] == int(row.argmax())
    assert fp["sha256"] == hashlib.sha256(row.astype("<f4").tobytes()).hexdigest()


# --- on a sealed CPU record ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sealed(tmp_path_factory, small_params):
    return Path(run_probe(small_params(), out_root=tmp_path_factory.mktemp("fp"), progress=False))


def test_the_record_holds_the_fingerprints_of_its_own_logits(sealed):
    m = json.loads((sealed / "metrics.json").read_text())
    with np.load(sealed / "logits.npz") as z:
        d, r = z["decode"], z["reference"]
    for j, row in enumerate(m["per_position"]):
        assert row["fingerprint"][row["source"]]["sha256"] == hashlib.sha256(d[j].astype("<f4").tobytes()).hexdigest()
        assert row["fingerprint"]["reference"]["top_ids"][0] == int(r[j].argmax())


def _without_logits(sealed, tmp_path) -> Path:
    d = tmp_path / sealed.name
    shutil.copytree(sealed, d)
    (d / "logits.npz").unlink()
    return d


def test_without_logits_a_flipped_bit_exact_is_caught_by_the_fingerprints(sealed, tmp_path):
    d = _without_logits(sealed, tmp_path)
    assert verify(d, allow_missing_large=True) == []  # the control: the honest record verifies without logits
    rep = analyze_run(d)
    assert rep["status"] == "MISSING_LOGITS" and any("fingerprints agree" in r for r in rep["reasons"])
    for name in ("metrics.json", "verdict.json"):  # every statement of bit_exact, consistently, and resealed
        obj = json.loads((d / name).read_text())
        obj["bit_exact"] = False
        (d / name).write_text(json.dumps(obj, indent=2))
    # report.md as the falsified data renders it (verify renders it again and compares bytes)
    (d / "report.md").write_text(rendered_report(read_record(d)), encoding="utf-8")
    seal(d)
    reasons = verify(d, allow_missing_large=True)
    assert reasons == ["metrics.json bit_exact is False but the fingerprints say every position is bit-identical"]
    assert any(r.startswith("metrics.json bit_exact is False") for r in analyze_run(d)["reasons"])
