"""The original engine's traces (greta/legacy.py): both layouts, built here per the module's docstring."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from greta.__main__ import main
from greta.checks.legacy import find_points, read_runs, table_md

VOCAB = 64


def _trace(d: Path, *, ctx, kv, seed, span, logits, tokens=None, peak=None):
    d.mkdir(parents=True, exist_ok=True)
    meta = {"ctx": ctx, "kv_aligned": kv, "seed": seed, "span": span, "model": "llama3-8b"}
    if peak is not None:
        meta["peak_vram_mb"] = peak
    (d / "metadata.json").write_text(json.dumps(meta))
    with gzip.open(d / "logits.jsonl.gz", "wt") as f:
        for j, row in enumerate(logits):
            line = {"step": j, "position": ctx - 1 + j, "logits": [float(x) for x in row]}
            if tokens is not None:
                line["token"] = int(tokens[j])
            f.write(json.dumps(line) + "\n")


def _point(d: Path, *, ctx, kv, seed, span=4, drift=0.0, peak=None):
    """prefill/ = reference logits; decode/ = the same plus `drift` on one logit per step."""
    rng = np.random.default_rng(seed * 1000 + ctx + kv)
    ref = rng.standard_normal((span, VOCAB)).astype(np.float32)
    dec = ref.copy()
    dec[:, 3] += drift
    _trace(d / "prefill", ctx=ctx, kv=kv, seed=seed, span=span, logits=ref, peak=peak)
    _trace(d / "decode", ctx=ctx, kv=kv, seed=seed, span=span, logits=dec, tokens=ref.argmax(-1), peak=peak)
    return ref, dec


@pytest.fixture
def b3_67(tmp_path):
    runs = tmp_path / "old" / "runs"
    for kv in (0, 1):
        for seed in (0, 1, 2):
            _point(runs / f"kv_aligned_{kv}" / f"seed_{seed}", ctx=32768, kv=kv, seed=seed,
                   drift=0.04 if kv == 0 else (0.0 if seed != 2 else 1e-3), peak=19800 + seed)
    return tmp_path / "old"


@pytest.fixture
def b3_77(tmp_path):
    runs = tmp_path / "runs"
    for kv in (0, 1):
        for ctx in (4096, 8192):
            _point(runs / f"kv_{kv}" / "seed_0" / f"ctx_{ctx}", ctx=ctx, kv=kv, seed=0, drift=0.5 if kv == 1 and ctx == 8192 else 0.0)
    return runs


def test_b3_67_layout(b3_67):
    rows = read_runs(b3_67)
    assert [(r["layout"], r["kv_aligned"], r["seed"]) for r in rows] == [("b3_67", k, s) for k in (0, 1) for s in (0, 1, 2)]
    assert all(r["status"] == "OK" and r["ctx"] == 32768 for r in rows), [r["reasons"] for r in rows]
    by = {(r["kv_aligned"], r["seed"]): r for r in rows}
    assert by[(0, 1)]["verdict"] == "EXPECTED_DRIFT" and by[(0, 1)]["max_abs_diff"] == pytest.approx(0.04, rel=1e-5)
    assert by[(1, 0)]["verdict"] == "PASS_EQUIV" and by[(1, 0)]["metrics"]["bit_exact"] is True
    assert by[(1, 2)]["verdict"] == "PASS_EQUIV" and by[(1, 2)]["metrics"]["bit_exact"] is False
    assert by[(1, 2)]["peak_vram_mb"] == 19802
    t = table_md(rows).splitlines()
    assert t[0].startswith("| Context | KV | Peak VRAM (MB) | Max Logits Diff | Top-1 Agreement | Verdict |")
    assert "| 32768 | 1 | 19800 | 0.000000 | 1.0000 | PASS_EQUIV | 0 | b3_67 | OK |" in t


def test_b3_77_layout_and_a_failing_point(b3_77):
    rows = read_runs(b3_77)
    assert [(r["ctx"], r["kv_aligned"]) for r in rows] == [(4096, 0), (4096, 1), (8192, 0), (8192, 1)]
    bad = rows[3]
    assert bad["status"] == "OK" and bad["verdict"] == "FAIL_EQUIV" and "max_abs_diff > 0.005" in bad["verdict_reason"]
    assert rows[1]["verdict"] == "PASS_EQUIV" and rows[0]["verdict"] == "EXPECTED_DRIFT"
    # the argmax moves where the drift is large: top-1 agreement follows the logits, not a stored claim
    ref = np.array([json.loads(x)["logits"] for x in gzip.open(Path(bad["path"]) / "prefill" / "logits.jsonl.gz", "rt")])
    want = np.mean((ref + np.eye(VOCAB)[3] * 0.5).argmax(-1) == ref.argmax(-1))
    assert bad["top1_agreement"] == pytest.approx(want)


def _gz(p: Path, text: bytes):
    with gzip.open(p, "wb") as f:
        f.write(text)


@pytest.mark.parametrize("damage,status,words", [
    (lambda d: (d / "decode" / "logits.jsonl.gz").unlink(), "MISSING", "logits.jsonl.gz is missing"),
    (lambda d: (d / "prefill" / "metadata.json").unlink(), "MISSING", "metadata.json is missing"),
    (lambda d: (d / "decode" / "logits.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage"), "CORRUPT", "not a readable gzip"),
    (lambda d: (d / "decode" / "logits.jsonl.gz").write_bytes((d / "decode" / "logits.jsonl.gz").read_bytes()[:60]), "CORRUPT", "gzip"),
    (lambda d: _gz(d / "decode" / "logits.jsonl.gz", b'{"step": 0, "logits": [1, 2\n'), "CORRUPT", "line 1 is not JSON"),
    (lambda d: _gz(d / "decode" / "logits.jsonl.gz", b'{"step": 0}\n'), "CORRUPT", "lacks an integer 'step'"),
    (lambda d: _gz(d / "decode" / "logits.jsonl.gz", b'{"step": 0, "logits": [1]}\n'), "MISMATCH", "metadata span is 4"),
    (lambda d: _gz(d / "decode" / "logits.jsonl.gz", b"".join(b'{"step": %d, "logits": ["a", 2]}\n' % j for j in range(4))), "CORRUPT", "not equal-length lists of numbers"),
    (lambda d: (d / "prefill" / "metadata.json").write_text("{not json"), "CORRUPT", "unreadable"),
    (lambda d: (d / "prefill" / "metadata.json").write_text('{"ctx": 4096, "kv_aligned": 1, "seed": 0}'), "CORRUPT", "lacks an integer 'span'"),
    (lambda d: (d / "decode" / "metadata.json").write_text('{"ctx": 4096, "kv_aligned": 0, "seed": 0, "span": 4}'), "MISMATCH", "directory names say"),
    (lambda d: (d / "decode" / "metadata.json").write_text('{"ctx": 4096, "kv_aligned": 1, "seed": 0, "span": 3}'), "MISMATCH", "differ in span"),
])
def test_damaged_traces_give_one_line_reasons(b3_77, damage, status, words):
    d = b3_77 / "kv_1" / "seed_0" / "ctx_4096"
    damage(d)
    rows = read_runs(b3_77)
    r = next(r for r in rows if r["path"] == str(d))
    assert r["status"] == status and len(r["reasons"]) == 1, r
    assert words in r["reasons"][0] and "\n" not in r["reasons"][0] and r["verdict"] is None
    assert sum(x["status"] == "OK" for x in rows) == 3  # the others are still read


def test_cli(b3_67, b3_77, tmp_path, capsys):
    assert main(["legacy", str(b3_67)]) == 0
    out = capsys.readouterr().out
    assert out.count("| b3_67 | OK |") == 6 and "Traceback" not in out
    (b3_77 / "kv_0" / "seed_0" / "ctx_8192" / "decode" / "logits.jsonl.gz").write_bytes(b"nope")
    assert main(["legacy", str(b3_77)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and "ctx_8192" in out and "Traceback" not in out
    assert main(["legacy", str(b3_77), "--json"]) == 1
    js = json.loads(capsys.readouterr().out)
    assert len(js) == 4 and {r["status"] for r in js} == {"OK", "CORRUPT"}
    (tmp_path / "empty").mkdir()
    assert main(["legacy", str(tmp_path / "empty")]) == 2
    assert main(["legacy", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_find_points_ignores_other_folders(tmp_path):
    (tmp_path / "runs" / "kv_x" / "seed_0").mkdir(parents=True)
    (tmp_path / "runs" / "notes" / "seed_0" / "ctx_1").mkdir(parents=True)
    assert find_points(tmp_path) == []


def test_find_points_orders_ties_by_path(tmp_path):
    """Two directories naming the same point (kv_aligned_1, kv_aligned_01) come in path order, not disk order."""
    for kv in ("1", "01", "0"):
        (tmp_path / "runs" / f"kv_aligned_{kv}" / "seed_0").mkdir(parents=True)
    pts = find_points(tmp_path)
    assert [Path(p["path"]).parent.name for p in pts] == ["kv_aligned_0", "kv_aligned_01", "kv_aligned_1"]
    assert [p["kv_aligned"] for p in pts] == [0, 1, 1]
