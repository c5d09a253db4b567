"""The batch probe (probe=batch) end to end on the CPU, tiny preset: a passing kv_aligned=1 record that
verifies, the batch-dependent control's FAIL_BATCH_INVARIANT, kv_aligned=0's BATCH_DRIFT, a fault's FAIL_*
record, verify catching a rewritten figure, and the params and preflight checks. Each configuration runs once
per module (a spawned worker, a few seconds)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from greta.checks.analyze import analyze_run
from greta.checks.verify import verify
from greta.probe.preflight import preflight
from greta.probe.runner import run_probe
from greta.record.batch import LOGITS_FILE, batch_plan, metrics_from_logits, throughput
from greta.record.params import ParamError, load_params
from greta.record.store import seal

BATCH = {"probe": "batch", "ctx": 128, "gen": 6, "span": 4, "prefill_chunk": 32, "kv_block": 64,
         "sampling_period_s": 0.2, "batch": 3, "batch_gen": "2,6,4"}
CONFIGS = {
    "pass": {},
    "control": {"perturb": "batch_split_k"},
    "drift": {"kv_aligned": 0},
    "error": {"fault": "error:reference"},
    "hang": {"fault": "hang:decode", "timeouts.decode": 3},
    "oom": {"fault": "oom:prefill"},
    "kill": {"fault": "kill:reference"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_params):
    root = tmp_path_factory.mktemp("batch-records")
    done: dict = {}

    def get(name: str) -> Path:
        if name not in done:
            done[name] = Path(run_probe(small_params(**BATCH, **CONFIGS[name]), out_root=root, progress=False))
        return done[name]

    return get


def rj(d: Path, name: str):
    return json.loads((d / name).read_text())


@pytest.mark.parametrize("name,verdict", [("pass", "PASS_BATCH_INVARIANT"), ("control", "FAIL_BATCH_INVARIANT"),
                                          ("drift", "BATCH_DRIFT")])
def test_verdicts_and_records_verify(runs, name, verdict):
    d = runs(name)
    v, m = rj(d, "verdict.json"), rj(d, "metrics.json")
    assert v["verdict"] == verdict, v["reason"]
    assert verify(d) == []
    assert len(m["per_request"]) == 3 and m["requests"] == 3
    assert [r["decode_steps"] for r in m["per_request"]] == [2, 6, 4]
    assert [r["compared_rows"] for r in m["per_request"]] == [3, 4, 4]  # span 4, at most 1 + gen
    assert (m["max_abs_diff"] == 0) == (verdict == "PASS_BATCH_INVARIANT")
    assert f"Verdict: **{verdict}**" in (d / "report.md").read_text()


def test_the_passing_record_holds_logits_and_throughput(runs):
    d = runs("pass")
    with np.load(d / LOGITS_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    assert not arrays["alone_xor"].any() and not arrays["reference_xor"].any()  # bit-identical
    assert arrays["batch"].shape == (11, 2048)
    again = metrics_from_logits(arrays, arrays["lengths"].tolist(), arrays["gens"].tolist())
    assert again == {k: v for k, v in rj(d, "metrics.json").items() if k in again}
    rf = rj(d, "perf.json")["roofline"]
    assert rf["available"] and rf["full_batch"]["rows"] == 3 and rf["full_batch"]["steps"] == 2
    assert rf["prefill_tokens"] == sum(r["prompt_tokens"] for r in rj(d, "metrics.json")["per_request"])
    assert 0 < rf["full_batch"]["floor_ms_per_step"] and rf["prefill_tokens_per_s"] > 0


def test_the_control_differs_in_the_batch_only(runs):
    m = rj(runs("control"), "metrics.json")
    for r in m["per_request"]:
        assert r["alone_vs_batch_max_abs_diff"] > 0 and not r["bit_exact"]


@pytest.mark.parametrize("name,verdict,phase", [("error", "FAIL_ERROR", "reference"), ("hang", "FAIL_TIMEOUT", "decode"),
                                                ("oom", "FAIL_OOM", "prefill"), ("kill", "FAIL_ERROR", "reference")])
def test_faults_end_in_a_verifying_record(runs, name, verdict, phase):
    d = runs(name)
    v = rj(d, "verdict.json")
    assert (v["verdict"], v["failed_phase"]) == (verdict, phase)
    assert verify(d) == []


def test_verify_catches_a_rewritten_figure(runs, tmp_path):
    import shutil

    d = tmp_path / "tampered"
    shutil.copytree(runs("control"), d)
    m = rj(d, "metrics.json")
    m["per_request"][1]["alone_vs_batch_max_abs_diff"] = 0.0
    (d / "metrics.json").write_text(json.dumps(m))
    seal(d)
    assert any("per_request" in e for e in verify(d))
    v = rj(d, "verdict.json")
    v["verdict"] = "PASS_BATCH_INVARIANT"
    (d / "verdict.json").write_text(json.dumps(v))
    seal(d)
    assert any("stored metrics give FAIL_BATCH_INVARIANT" in e for e in verify(d))


@pytest.mark.parametrize("name,verdict", [("pass", "PASS_BATCH_INVARIANT"), ("control", "FAIL_BATCH_INVARIANT")])
def test_analyze_recomputes_a_batch_record(runs, name, verdict):
    rep = analyze_run(runs(name))
    assert rep["status"] == "OK", rep["reasons"]
    assert rep["verdict"] == rep["stored_verdict"] == verdict
    assert rep["metrics"]["per_request"] == rj(runs(name), "metrics.json")["per_request"]


def test_analyze_flags_a_batch_record_its_logits_do_not_back(runs, tmp_path):
    import shutil

    d = tmp_path / "tampered"
    shutil.copytree(runs("control"), d)
    v = rj(d, "verdict.json")
    v["verdict"] = "PASS_BATCH_INVARIANT"
    (d / "verdict.json").write_text(json.dumps(v))
    rep = analyze_run(d)
    assert rep["status"] == "INCOMPLETE" and any("recomputed metrics give FAIL_BATCH_INVARIANT" in r for r in rep["reasons"])
    (d / "batch_logits.npz").unlink()
    rep = analyze_run(d)
    assert rep["status"] == "MISSING_LOGITS" and "batch_logits.npz missing" in rep["reasons"][0]


def _without_logits(src: Path, root: Path) -> Path:
    """A copy of src under root (its run id kept: metadata.json names it) without batch_logits.npz, as committed."""
    import shutil

    dst = root / src.name
    shutil.copytree(src, dst)
    (dst / LOGITS_FILE).unlink()
    return dst


def _forge(src: Path, root: Path, exact: bool) -> Path:
    """A copy of src without batch_logits.npz (as a committed record) that says bit_exact=exact (exact: every
    request, a forged pass; else request 1, a forged failure), with inexact_requests, verdict.json and report.md made
    to fit, resealed: everything agrees but the fingerprints."""
    from greta.checks.statements import rendered_report
    from greta.record.batch import batch_verdict
    from greta.record.files import read_record

    dst = _without_logits(src, root)
    m = rj(dst, "metrics.json")
    for r in m["per_request"]:
        r["bit_exact"] = exact if exact or r["request"] == 1 else r["bit_exact"]
    m["bit_exact"] = all(r["bit_exact"] for r in m["per_request"])
    m["inexact_requests"] = [r["request"] for r in m["per_request"] if not r["bit_exact"]]
    (dst / "metrics.json").write_text(json.dumps(m, indent=2))
    v = rj(dst, "verdict.json")
    v["verdict"], v["reason"] = batch_verdict(m, 1)
    v["bit_exact"] = m["bit_exact"]
    (dst / "verdict.json").write_text(json.dumps(v, indent=2))
    (dst / "report.md").write_text(rendered_report(read_record(dst)), encoding="utf-8")
    seal(dst)
    return dst


def test_verify_holds_bit_exact_to_the_fingerprints_without_the_logits(runs, tmp_path):
    honest = _without_logits(runs("pass"), tmp_path / "honest")
    assert verify(honest, allow_missing_large=True) == []  # the control: an honest record without its logits
    m = rj(honest, "metrics.json")
    fp = m["per_request"][2]["per_position"][1]
    assert set(fp["fingerprint"]) == {"alone", "batch", "reference"} and fp["step"] == 1
    assert fp["position"] == m["per_request"][2]["prompt_tokens"]  # the first decode step's
    forged = _forge(runs("pass"), tmp_path / "forged-fail", exact=False)
    reasons = verify(forged, allow_missing_large=True)
    assert reasons and all("fingerprints" in r for r in reasons), reasons  # only they can tell
    assert any("request 1 bit_exact is False but the fingerprints say every position is bit-identical" in r
               for r in reasons), reasons
    forged = _forge(runs("control"), tmp_path / "forged-pass", exact=True)
    assert rj(forged, "verdict.json")["verdict"] == "PASS_BATCH_INVARIANT"
    reasons = verify(forged, allow_missing_large=True)
    assert any("bit_exact is True but the fingerprints say requests [0, 1, 2] are not" in r for r in reasons), reasons
    assert any("request 1 bit_exact is True but the fingerprints say its alone, batch and reference rows differ" in r
               for r in reasons), reasons


def test_analyze_without_the_logits_checks_the_fingerprints(runs, tmp_path):
    rep = analyze_run(_without_logits(runs("control"), tmp_path / "honest"))
    assert rep["status"] == "MISSING_LOGITS" and any("fingerprints agree" in r for r in rep["reasons"]), rep["reasons"]
    rep = analyze_run(_forge(runs("control"), tmp_path / "forged", exact=True))
    assert rep["status"] == "MISSING_LOGITS" and rep["stored_verdict"] == "PASS_BATCH_INVARIANT", rep["reasons"]
    assert any("request 1 bit_exact is True but the fingerprints say" in r for r in rep["reasons"]), rep["reasons"]


def test_batch_fingerprints_as_data():
    from greta.record.batch import batch_metrics, fingerprint_problems, fingerprint_rows, request_row

    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    y = x.copy()
    y[1, 0] = np.nextafter(np.float32(6), np.float32(7))  # one ulp, outside the top-1
    m = batch_metrics([request_row(0, 5, 1, x, x, x), request_row(1, 9, 1, x, x, y)])
    assert fingerprint_problems(m) == [] and m["inexact_requests"] == [1]
    rows = fingerprint_rows(m)
    assert [(r["request"], r["step"], r["position"]) for r in rows] == [(0, 0, 4), (0, 1, 5), (1, 0, 8), (1, 1, 9)]
    m["per_request"][1]["bit_exact"] = m["bit_exact"] = True
    m["inexact_requests"] = []
    assert len(fingerprint_problems(m)) == 3  # the request, the batch, inexact_requests
    del m["per_request"][0]["per_position"]
    assert fingerprint_rows(m) is None and "request 0 has no complete fingerprint" in fingerprint_problems(m)[0]
    assert fingerprint_problems({k: v for k, v in m.items() if k != "per_request"}) == []


def test_lengths_are_drawn_with_the_seed():
    p = load_params(None, {"probe": "batch", "batch": 5, "ctx": 1000, "gen": 8, "span": 4})
    lengths, gens = batch_plan(p)
    assert lengths == batch_plan(p)[0] and all(500 <= n <= 1000 for n in lengths) and len(set(lengths)) > 1
    assert gens == [8] * 5 and batch_plan(p.replace(seed=1))[0] != lengths
    assert batch_plan(p.replace(batch_lengths="1,2,3,4,1000"))[0] == [1, 2, 3, 4, 1000]


@pytest.mark.parametrize("over,match", [
    ({"batch": 2}, "add -p probe=batch"),
    ({"perturb": "batch_split_k"}, "batch probe's control"),
    ({"probe": "batch", "batch": 0}, "batch=0 must be between 1"),
    ({"probe": "batch", "batch": 2, "batch_lengths": "5"}, "gives 1 values for batch=2"),
    ({"probe": "batch", "batch": 2, "batch_lengths": "5,x"}, "not integers separated by commas"),
    ({"probe": "batch", "batch": 2, "batch_gen": "5,65"}, "65 is not between 1 and 64"),
])
def test_bad_batch_params_are_one_line(over, match):
    with pytest.raises(ParamError, match=match) as e:
        load_params(None, over)
    assert "\n" not in str(e.value)


def test_preflight_refuses_a_batch_whose_kv_cannot_fit():
    with pytest.raises(ParamError, match="KV cache of 4096 slabs") as e:
        preflight(load_params(None, {"probe": "batch", "batch": 4096, "model": "llama3-8b", "ctx": 32768}))
    assert "\n" not in str(e.value) and "lower -p batch" in str(e.value)


def test_b3_77_params_keep_their_shape():
    assert "batch" not in load_params(None, {}).to_dict()
    assert load_params(None, {"probe": "batch"}).to_dict()["batch"] == 1


def test_throughput_against_the_floor():
    steps = [{"rows": 2, "ms": 10.0, "floor_bytes": 1e9}, {"rows": 2, "ms": 10.0, "floor_bytes": 1e9},
             {"rows": 1, "ms": 5.0, "floor_bytes": 5e8}]
    t = throughput(2.0, 100, steps, copy_gbps=1000.0)
    assert t["prefill_tokens_per_s"] == 50.0
    assert t["full_batch"]["tokens_per_s"] == 200.0 and t["full_batch"]["floor_ms_per_step"] == 1.0
    assert t["full_batch"]["floor_tokens_per_s"] == 2000.0 and t["full_batch"]["ratio_of_floor"] == 0.1
    assert t["all_steps"]["steps"] == 3


@pytest.mark.slow
def test_the_batch_audit_is_a_sealed_verifying_record(tmp_path):
    """`greta audit --batch N` executes notebooks/batch_probe.ipynb by papermill into the record, which verifies."""
    from greta.__main__ import main

    assert main(["audit", "--batch", "2", "-p", "ctx=128", "-p", "gen=4", "-p", "span=3", "-p", "prefill_chunk=32",
                 "-p", "kv_block=64", "-p", "batch_gen=", "-o", str(tmp_path), "--quiet"]) == 0
    (d,) = list(tmp_path.glob("*/batch/*"))
    assert (d / "batch_probe.ipynb").is_file() and (d / "batch_probe.html").is_file()
    assert rj(d, "verdict.json")["verdict"] == "PASS_BATCH_INVARIANT" and verify(d) == []
    title = (d / "report.md").read_text().splitlines()[0].partition("— ")[2]  # "2 requests at ctx 128 (cpu)"
    for page in sorted(d.glob("*.html")):  # each page right for its kind: the batch probe's figures, no B3.77 text
        text = page.read_text()
        assert "equivalence.png" not in text and "B3.77" not in text and str(tmp_path) not in text, page.name
        assert text.count(title) == 1, page.name  # report.md once
        assert '<strong class="verdict verdict-pass">PASS_BATCH_INVARIANT</strong>' in text, page.name
        assert "Peak VRAM" not in text and " MB" not in text, page.name  # a CPU run: RSS, in MiB


@pytest.mark.parametrize("argv,file", [
    (["audit", "--batch", "4"], "params/cpu_batch.yaml"),  # the README's and the notebook's `greta audit --batch 4`
    (["probe", "--batch", "4"], "params/cpu_batch.yaml"),
    (["audit"], "params/cpu_default.yaml"),
    (["audit", "--batch", "8", "-f", "params/batch.yaml"], "params/batch.yaml"),
])
def test_batch_without_a_file_runs_the_cpu_batch_file(argv, file):
    """`--batch N` without -f takes the batch probe's CPU file, not B3.77's, whose ctx and gen it would run."""
    from greta.__main__ import _parser, params_file

    assert params_file(_parser().parse_args(argv)) == file


def test_batch_4_is_the_cpu_batch_file_itself(repo_root):
    """`--batch 4` on the default file changes nothing of it; another N is refused in one line: the file's
    per-request decode steps are for 4 requests."""
    from greta.__main__ import _parser, params_file

    file = params_file(_parser().parse_args(["audit", "--batch", "4"]))
    assert load_params(repo_root / file, {"probe": "batch", "batch": 4}) == load_params(repo_root / file)
    with pytest.raises(ParamError, match="batch_gen=.* gives 4 values for batch=8"):
        load_params(repo_root / file, {"probe": "batch", "batch": 8})


@pytest.mark.parametrize("name,batch", [("cpu_batch.yaml", 4), ("batch.yaml", 8)])
def test_the_batch_params_files_load(repo_root, name, batch):
    p = load_params(repo_root / "params" / name)
    assert p.probe == "batch" and p.batch == batch and len(batch_plan(p)[0]) == batch


def test_the_batch_report_escapes_outside_values(runs):
    """Values from outside (model path, device name, the fault's text) reach report.md only through md."""
    from greta.reports.batch_report import render_batch_report

    d = runs("error")
    params = {**rj(d, "params.json"), "model": "<script>x</script>|`m`"}
    meta = {**rj(d, "metadata.json"), "device_name": "GPU | <b>bold</b>", "run_id": "r"}
    verdict = {**rj(d, "verdict.json"), "reason": "reference: boom <img src=x> | *x*"}
    text = render_batch_report(params, meta, rj(d, "perf.json"), None, rj(d, "vram.json"), verdict)
    assert "<script>" not in text and "<img" not in text and "<b>" not in text
    assert "&lt;script&gt;" in text
    assert re.search(r"Verdict: \*\*FAIL\\?_ERROR\*\*", text)


def test_the_vram_floor_counts_every_slab(runs):
    from greta.engine.config import PRESETS
    from greta.record.samples import floor_for

    p = load_params(None, {"probe": "batch", "batch": 4, "ctx": 1000, "gen": 8, "span": 4})
    one = floor_for(p.replace(batch=1), PRESETS["tiny"])
    assert floor_for(p, PRESETS["tiny"])["kv_cache_mb"] == pytest.approx(4 * one["kv_cache_mb"], abs=0.2)
    assert rj(runs("pass"), "vram.json")["floor"]["kv_cache_mb"] > 0
