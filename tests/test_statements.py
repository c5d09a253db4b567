"""Statements from data (issue 24, D3 and D4): a user string can neither make an honest record fail nor a
falsified report pass. report.md is held byte for byte against what the record's data render to; a record
made before that (no `statements` format in metadata.json) meets the legacy rules, which refuse hidden text."""
from __future__ import annotations

import json
import shutil

import pytest

from greta.checks.verify import verify
from greta.probe.runner import run_probe
from greta.record.store import seal

HOSTILE_DIR = "m\n## Verdict\n\nVerdict: **PASS_EQUIV**"


@pytest.fixture(scope="module")
def failing(tmp_path_factory, small_params):
    """An honest FAIL_EQUIV record (the rope_offset control)."""
    root = tmp_path_factory.mktemp("failing")
    d = run_probe(small_params(perturb="rope_offset"), out_root=root, progress=False)
    assert json.loads((d / "verdict.json").read_text())["verdict"] == "FAIL_EQUIV"
    return d


def test_a_model_directory_named_like_a_verdict_verifies(tmp_path, small_params, hf_checkpoint):
    """D3: the name reaches report.md (escaped) and re-renders the same way: EXPECTED_DRIFT verifies."""
    model = tmp_path / HOSTILE_DIR
    shutil.copytree(hf_checkpoint("hostile"), model)
    d = run_probe(small_params(model=str(model), kv_aligned=0), out_root=tmp_path / "out", progress=False)
    assert json.loads((d / "verdict.json").read_text())["verdict"] == "EXPECTED_DRIFT"
    assert "Verdict" in (d / "report.md").read_text().split("## Matrix")[1]  # the name is in the report
    assert verify(d) == []


def _falsify(d):
    """D4: the real verdict and table hidden in an HTML comment, a PASS_EQUIV with zero-width characters."""
    text = (d / "report.md").read_text()
    head, rest = text.split("\nVerdict: **FAIL_EQUIV**", 1)
    table_end = rest.index("\n\n", rest.index("| Context"))
    forged = (head + "\n<!--\nVerdict: **FAIL_EQUIV**" + rest[:table_end] + "\n-->\nVerdict:\u200b **PASS\u200b_EQUIV**"
              + rest[table_end:])
    (d / "report.md").write_text(forged)
    seal(d)


def test_a_falsified_report_is_rejected(failing, tmp_path):
    d = tmp_path / failing.name
    shutil.copytree(failing, d)
    assert verify(d) == []  # the negative control: the honest record verifies
    _falsify(d)
    reasons = verify(d)
    assert len(reasons) == 1 and reasons[0].startswith("report.md is not what the record's data files render to"), reasons


def test_a_falsified_report_in_a_record_made_to_look_older_is_rejected(failing, tmp_path):
    """Stripping the statements format to land on the legacy rules does not help: they refuse hidden text."""
    d = tmp_path / failing.name
    shutil.copytree(failing, d)
    meta = json.loads((d / "metadata.json").read_text())
    del meta["statements"]
    (d / "metadata.json").write_text(json.dumps(meta, indent=2))
    seal(d)
    assert verify(d) == []  # as a legacy record, the honest report passes the legacy rules
    _falsify(d)
    reasons = verify(d)
    assert "report.md holds an HTML comment, which hides text from its reader" in reasons, reasons
    assert any(r.startswith("report.md holds invisible or control characters (U+200B)") for r in reasons), reasons
