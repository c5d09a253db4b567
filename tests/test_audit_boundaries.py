"""Ctrl-C at each boundary between the audit's steps (the probe sealed, each analysis notebook and its page
written): exit 130, one line, an INTERRUPTED record whose reason names where the run was, every page and
notebook stating a verdict consistent with verdict.json, and a record that verifies. The interrupt comes
deterministically (greta.audit.INTERRUPT_AT_ENV): the kernel at that boundary sends the audit its SIGINT."""
from __future__ import annotations

import json
import os

import pytest

from greta.audit import INTERRUPT_AT_ENV, interrupted_step
from greta.checks.verify import verify
from greta.reports import notebooks
from greta.reports.verdict_marks import notebook_verdicts, page_head, page_verdict, superseded

from test_audit import SMALL, greta, record_dirs

ANALYSIS = ("vram_plot.ipynb", "equivalence_analysis.ipynb")
WHERE = {"probe": "after the probe finished, before the analysis notebooks",
         "notebook:vram_plot.ipynb": "after vram_plot.ipynb finished, before equivalence_analysis.ipynb",
         "notebook:equivalence_analysis.ipynb": "after the analysis notebooks (vram_plot.ipynb, "
                                                "equivalence_analysis.ipynb) had finished"}


def test_the_step_an_interrupt_found_is_named_from_the_last_progress_line():
    assert interrupted_step([], ANALYSIS).startswith("after the probe finished")
    assert interrupted_step("phase reference 4 4 rows ok".split(), ANALYSIS).startswith("after the probe finished")
    assert interrupted_step("notebook vram_plot.ipynb 0 2".split(), ANALYSIS) == "during the analysis notebook vram_plot.ipynb"
    assert interrupted_step("notebook equivalence_analysis.ipynb 1 2".split(), ANALYSIS) == (
        "during the analysis notebook equivalence_analysis.ipynb (vram_plot.ipynb had finished)")
    assert interrupted_step("notebook vram_plot.ipynb 1 2".split(), ANALYSIS) == WHERE["notebook:vram_plot.ipynb"]
    for last in ("notebook equivalence_analysis.ipynb 2 2", "notebook done 2 2"):
        assert interrupted_step(last.split(), ANALYSIS).startswith(WHERE["notebook:equivalence_analysis.ipynb"])


@pytest.mark.slow
@pytest.mark.parametrize("boundary", list(WHERE))
def test_ctrl_c_at_a_boundary_gives_an_interrupted_record_that_verifies(tmp_path, repo_root, monkeypatch, boundary):
    monkeypatch.setenv(INTERRUPT_AT_ENV, boundary)
    r = greta(["audit", *SMALL, "-o", str(tmp_path), "--quiet"], cwd=repo_root)
    (d,) = record_dirs(tmp_path)
    assert r.returncode == 130, r.stderr[-3000:]
    assert r.stderr.splitlines() == [f"greta: INTERRUPTED by SIGINT (Ctrl-C); record: {d}"], r.stderr[-3000:]
    v = json.loads((d / "verdict.json").read_text())
    assert v["verdict"] == "INTERRUPTED" and v["failed_phase"] == "analysis" and v["probe_verdict"] == "PASS_EQUIV"
    assert f"interrupted by SIGINT (Ctrl-C) {WHERE[boundary]}" in v["reason"], v["reason"]
    for nb in d.glob("*.ipynb"):
        page = nb.with_suffix(".html").read_bytes()
        assert page_verdict(page) == "INTERRUPTED", nb.name
        body = json.loads(nb.read_text())
        stated = set(notebook_verdicts(body))
        if stated:  # it ran before the interrupt: marked, and says so first
            assert stated == {"PASS_EQUIV"} and superseded(body) == {"by": "INTERRUPTED", "states": "PASS_EQUIV"}
            assert "from before the interruption" in "".join(body["cells"][0]["source"]), nb.name
        if not notebooks.is_complete(nb):
            assert any("did not run to completion" in "".join(c["source"]) for c in body["cells"][:2]), nb.name
    assert verify(d) == []
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_page_or_notebook_stating_the_old_verdict_unmarked_is_refused(tmp_path):
    """The marks are what verify reads: a notebook stating the probe's verdict without its superseded mark, or
    a page whose mark is not verdict.json's, fails."""
    from greta.checks.statements import check_pages

    d = tmp_path / "rec"
    d.mkdir()
    nb = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "display_data", "data": {
        "text/markdown": "x", "application/vnd.greta.verdict+json": {"verdict": "PASS_EQUIV"}}}]}], "metadata": {}}
    (d / "a.ipynb").write_text(json.dumps(nb))
    (d / "a.html").write_text(page_head("PASS_EQUIV") + "<title>a</title>")
    v = {"verdict": "INTERRUPTED", "probe_verdict": "PASS_EQUIV"}
    errors = check_pages(d, v)
    assert any("a.html states the verdict PASS_EQUIV" in e for e in errors), errors
    assert any("a.ipynb states the verdict PASS_EQUIV" in e for e in errors), errors
    nb["metadata"] = {"greta": {"superseded": {"by": "INTERRUPTED", "states": "PASS_EQUIV"}}}
    (d / "a.ipynb").write_text(json.dumps(nb))
    (d / "a.html").write_text(page_head("INTERRUPTED") + "<title>a</title>")
    assert check_pages(d, v) == []
    assert check_pages(d, {"verdict": "INTERRUPTED", "probe_verdict": "FAIL_EQUIV"})  # not what the probe said
    os.remove(d / "a.html")
    (d / "b.html").write_text("<!DOCTYPE html>\n<html><body>Verdict: <strong>INTERRUPTED</strong>")
    assert any("b.html carries no verdict mark" in e for e in check_pages(d, v))
