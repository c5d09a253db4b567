"""The audit records committed under outputs/: every sealed one still verifies (its logits.npz stays out of
git), the committed sweep's guardrail follows from its points, and the records made before the manifest
existed are the ones outputs/README.md says so of."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from greta.checks.verify import verify

OUT = Path(__file__).resolve().parent.parent / "outputs"
SEALED = sorted(p.parent for p in OUT.rglob("manifest.json"))


def test_there_are_sealed_gpu_records():
    kinds = {p.relative_to(OUT).parts[1] for p in SEALED}
    assert {"b3_77", "oracle", "batch", "batch-sweep"} <= kinds, kinds  # a probe, the oracle, a batch probe, a sweep


@pytest.mark.parametrize("run_dir", SEALED, ids=lambda p: str(p.relative_to(OUT)))
def test_sealed_record_verifies(run_dir):
    assert verify(run_dir, allow_missing_large=True) == []


def test_unsealed_records_are_the_pre_manifest_ones():
    """A record without manifest.json is one of those outputs/README.md lists as made before the manifest."""
    readme = (OUT / "README.md").read_text()
    unsealed = [p.parent for p in OUT.rglob("params.json")
                if not (p.parent / "manifest.json").exists() and "points" not in p.parts]
    for d in unsealed:
        assert d.name in readme, f"{d} has no manifest and outputs/README.md does not list it"
        assert readme.index(d.name) > readme.index("## Records made before the manifest"), d


def test_committed_sweep_guardrail_follows_from_its_points():
    from greta.sweeps.sweep import read_config
    from greta.sweeps.report import collect, guardrail

    for sweep in sorted(OUT.glob("*/*-sweep/*")):
        stored = json.loads((sweep / "sweep_verdict.json").read_text())
        rows = collect(sweep, allow_missing_logits=True)  # logits.npz stays out of git
        assert len(rows) == len(stored["points"])
        verdict, _ = guardrail(rows, read_config(sweep))
        assert verdict == stored["verdict"], sweep
        html = (sweep / "sweep_report.html").read_text(encoding="utf-8")
        assert html.count('src="data:image/png') >= 3, sweep  # the kind's figures, embedded
