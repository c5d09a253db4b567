"""greta reproduce (greta.checks.reproduce, issue 24 item 1) on CPU records of the tiny preset: a fresh record
reproduces; a one-ulp change to decode attention in the re-run's worker DIFFERS at the decode phase (by the
logits, and by the fingerprints when the logits are absent); a record from another machine is NOT_COMPARABLE
with the reasons; a tampered or unsealed original is refused; the reproduction record verifies, and a falsified
one does not. Every comparison here is between two runs made on the machine running the test."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from greta.__main__ import main
from greta.checks.reproduce import OriginalRefused, reproduce
from greta.checks.statements import rendered_report
from greta.checks.verify import verify
from greta.probe.runner import run_probe
from greta.record.files import read_record
from greta.record.store import seal

BATCH = {"probe": "batch", "ctx": 128, "gen": 6, "span": 4, "prefill_chunk": 32, "kv_block": 64,
         "sampling_period_s": 0.2, "batch": 3, "batch_gen": "2,6,4"}

# Loaded by the re-run's worker process (spawned: a fresh interpreter, which imports sitecustomize from PYTHONPATH):
# decode attention's output row flipped in its last bit, in every layer. Nothing in greta knows of it.
ONE_ULP = textwrap.dedent('''
    import torch
    from greta.engine.ops.tiled_torch import TiledTorchOps

    _decode_attention = TiledTorchOps.decode_attention

    def decode_attention(self, q, kv, step):
        o = _decode_attention(self, q, kv, step).clone()
        ROWS.view({2: torch.int16, 4: torch.int32}[o.element_size()]).bitwise_xor_(1)
        return o

    TiledTorchOps.decode_attention = decode_attention
''')


def _one_ulp(tmp_path, monkeypatch, rows: str) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(ONE_ULP.replace("ROWS", rows))
    monkeypatch.setenv("PYTHONPATH", str(site))


@pytest.fixture(scope="module")
def original(tmp_path_factory, small_params) -> Path:
    return Path(run_probe(small_params(), out_root=tmp_path_factory.mktemp("orig"), progress=False))


def _copy(record: Path, tmp_path: Path, drop_logits: bool = False) -> Path:
    """A copy of record under tmp_path (its run id kept: metadata.json names it), without its logits file as a
    committed record is when drop_logits."""
    d = tmp_path / "copy" / record.name
    shutil.copytree(record, d)
    if drop_logits:
        for name in ("logits.npz", "batch_logits.npz"):
            (d / name).unlink(missing_ok=True)
    return d


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=2))


@pytest.fixture()
def one_ulp(tmp_path, monkeypatch):
    _one_ulp(tmp_path, monkeypatch, "o[step.rows[0]]")  # a single sequence's decode: its one row


@pytest.fixture()
def one_ulp_every_row(tmp_path, monkeypatch):
    # the batch's tiled decode lays each row at slot pos % chunk of a tile (ops/batch.py TiledBatchOps), so
    # step.rows[0] may be a filler: every row is flipped
    _one_ulp(tmp_path, monkeypatch, "o")


@pytest.fixture(scope="module")
def reproduced(original, tmp_path_factory) -> tuple[Path, dict]:
    return reproduce(original, out_root=tmp_path_factory.mktemp("repro"), progress=False)


def test_a_fresh_record_reproduces_and_its_record_verifies(original, reproduced):
    rdir, body = reproduced
    assert body["verdict"] == "REPRODUCED", body["reason"]
    assert body["comparison"]["by"] == "logits" and body["comparison"]["equal"]
    assert not body["environment"]["differs"]
    # the original lies in another output folder: named by its run id alone (a path to it would name this
    # machine's folders); the re-run, in the reproduction's own output folder, by its path relative to it too
    assert body["original"]["run_id"] == original.name and "path" not in body["original"]
    assert (rdir / body["rerun"]["path"] / "logits.npz").is_file()
    assert verify(rdir) == [] and verify(rdir / body["rerun"]["path"]) == []
    report = (rdir / "report.md").read_text()
    assert f"- Original: {original.name} · verdict" in report
    assert f"]({body['rerun']['path']}/report.md)" in report


def test_without_logits_the_fingerprints_reproduce(original, tmp_path):
    committed = _copy(original, tmp_path, drop_logits=True)
    rdir, body = reproduce(committed, out_root=tmp_path / "out", progress=False)
    assert body["verdict"] == "REPRODUCED", body["reason"]
    assert body["comparison"]["by"] == "fingerprints" and body["comparison"]["positions"] == 4
    assert verify(rdir) == []


def test_one_ulp_in_decode_attention_differs_at_the_decode_phase(original, tmp_path, one_ulp):
    rdir, body = reproduce(original, out_root=tmp_path, progress=False)
    assert body["verdict"] == "DIFFERS", body["reason"]
    first = body["comparison"]["first"]
    assert (first["path"], first["step"], first["array"]) == ("decode", 1, "decode")
    assert first["max_abs_diff"] > 0 and "prefill" not in body["comparison"]["differing"]
    assert "first difference: decode at step 1" in body["reason"]
    assert verify(rdir) == []


def test_one_ulp_without_logits_differs_by_the_fingerprints(original, tmp_path, one_ulp):
    committed = _copy(original, tmp_path, drop_logits=True)
    _, body = reproduce(committed, out_root=tmp_path / "out", progress=False)
    assert body["verdict"] == "DIFFERS", body["reason"]
    first = body["comparison"]["first"]
    assert body["comparison"]["by"] == "fingerprints" and (first["path"], first["step"]) == ("decode", 1)
    assert first["position"] == 256  # ctx: the first decode step's position
    assert "top-k" in body["reason"]


def test_a_record_from_another_machine_is_not_comparable(original, tmp_path):
    other = _copy(original, tmp_path)

    def elsewhere(meta):
        meta["device_name"] = "NVIDIA H100 80GB HBM3"
        meta["versions"]["torch"] = "2.11.0+cu130"
        meta["machine"]["cpu_model"] = "Intel(R) Xeon(R) Platinum 8480+"
    _edit_json(other / "metadata.json", elsewhere)
    # report.md names the device: render it again from the edited data, as the other machine would have
    (other / "report.md").write_text(rendered_report(read_record(other)), encoding="utf-8")
    seal(other)
    assert verify(other) == []
    rdir, body = reproduce(other, out_root=tmp_path / "out", progress=False)
    assert body["verdict"] == "NOT_COMPARABLE"
    assert body["environment"]["differs"] == ["device model", "torch", "CPU model"]
    assert body["reason"].startswith("the environment differs: device model, torch, CPU model; the bits happen to be equal")
    assert verify(rdir) == []


def test_an_original_without_logits_or_fingerprints_is_not_comparable_unrun(original, tmp_path):
    old = _copy(original, tmp_path, drop_logits=True)

    def strip(m):
        for row in m["per_position"]:
            del row["fingerprint"]
    _edit_json(old / "metrics.json", strip)
    seal(old)
    assert verify(old, allow_missing_large=True) == []
    rdir, body = reproduce(old, out_root=tmp_path / "out", progress=False)
    assert body["verdict"] == "NOT_COMPARABLE" and "no fingerprints" in body["reason"] and body["rerun"] is None
    assert not (tmp_path / "out").joinpath(rdir.parent.parent.name, "b3_77").exists()  # nothing was re-run
    assert verify(rdir) == []


@pytest.fixture(scope="module")
def batch(tmp_path_factory, small_params) -> Path:
    return Path(run_probe(small_params(**BATCH), out_root=tmp_path_factory.mktemp("batch"), progress=False))


def test_a_batch_record_reproduces_by_its_logits(batch, tmp_path):
    _, body = reproduce(batch, out_root=tmp_path / "out", progress=False)
    assert body["verdict"] == "REPRODUCED" and body["comparison"]["by"] == "logits"


def test_a_batch_record_without_its_logits_reproduces_by_its_fingerprints(batch, tmp_path):
    rdir, body = reproduce(_copy(batch, tmp_path, drop_logits=True), out_root=tmp_path / "out", progress=False)
    assert body["verdict"] == "REPRODUCED", body["reason"]
    assert body["comparison"]["by"] == "fingerprints" and body["comparison"]["positions"] == 3 + 4 + 4  # compared rows
    assert verify(rdir) == []


def test_one_ulp_in_a_batch_differs_by_request_path_and_position(batch, tmp_path, one_ulp_every_row):
    lengths = [r["prompt_tokens"] for r in json.loads((batch / "metrics.json").read_text())["per_request"]]
    rdir, body = reproduce(_copy(batch, tmp_path, drop_logits=True), out_root=tmp_path / "out", progress=False)
    assert body["verdict"] == "DIFFERS", body["reason"]
    first = body["comparison"]["first"]
    # decode attention changed: request 0's first decode step, decoded alone (the paths in the order alone, batch,
    # reference); its prefill row (step 0) and every reference row (prefill) are the same bits
    assert (first["request"], first["path"], first["step"], first["position"]) == (0, "alone", 1, lengths[0])
    assert "reference" not in body["comparison"]["differing"]
    assert f"first difference: request 0 alone at step 1 (position {lengths[0]})" in body["reason"]
    assert f"First difference: request 0 · path `alone` · step 1 · position {lengths[0]}" in (rdir / "report.md").read_text()
    assert verify(rdir) == []


def test_a_batch_record_without_fingerprints_is_not_comparable_unrun(batch, tmp_path):
    old = _copy(batch, tmp_path, drop_logits=True)

    def strip(m):
        for r in m["per_request"]:
            del r["per_position"]
    _edit_json(old / "metrics.json", strip)
    seal(old)
    assert verify(old, allow_missing_large=True) == []  # a record made before fingerprints: not checked, accepted
    _, body = reproduce(old, out_root=tmp_path / "out", progress=False)
    assert body["verdict"] == "NOT_COMPARABLE" and "no fingerprints" in body["reason"] and body["rerun"] is None


def test_a_tampered_or_unsealed_original_is_refused(original, tmp_path, capsys):
    tampered = _copy(original, tmp_path)
    with open(tampered / "report.md", "a") as f:
        f.write("\nVerdict: **PASS_EQUIV**\n")
    with pytest.raises(OriginalRefused, match="does not verify .*report.md changed after the record was sealed"):
        reproduce(tampered, out_root=tmp_path / "out", progress=False)
    (tampered / "manifest.json").unlink()
    assert main(["reproduce", str(tampered), "-o", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json is missing" in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_bad_input_is_one_line_and_exit_2(original, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [[str(tmp_path / "nope\x1b[31m")], [str(tmp_path / "empty")], [str(original / "report.md")],
             [str(original), "-o", str(original / "inside")], [str(original), "-o", str(original / "report.md")],
             [""]]
    for argv in cases:
        assert main(["reproduce", *argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("greta: error:"), err
        assert "\x1b" not in err
    assert not (original / "inside").exists()


def test_a_falsified_reproduction_record_does_not_verify(reproduced, tmp_path):
    rdir = _copy(reproduced[0], tmp_path)
    assert verify(rdir) == []  # the control: as written, it verifies
    for name in ("reproduction.json", "verdict.json"):
        _edit_json(rdir / name, lambda v: v.update(verdict="DIFFERS"))
    seal(rdir)
    reasons = verify(rdir)
    assert any("its stored comparison gives REPRODUCED" in r for r in reasons), reasons
    assert any("report.md is not the rendering of reproduction.json" in r for r in reasons), reasons


# --- a re-run that does not finish ---------------------------------------------------------------------------
# The original must be a complete record (a fault record holds nothing to compare and is not re-run), so the fault
# is injected into the re-run's worker alone, as ONE_ULP is: decode attention, the decode phase's own op, replaced.
FAULT_IN_DECODE = textwrap.dedent('''
    import os
    import signal
    import time

    import torch
    from greta.engine.ops.tiled_torch import TiledTorchOps

    def decode_attention(self, q, kv, step):
        ACTION

    TiledTorchOps.decode_attention = decode_attention
''')
FAULTS = {"error": ('raise RuntimeError("decode attention failed (injected)")', "FAIL_ERROR", "decode attention failed"),
          "kill": ("os.kill(os.getpid(), signal.SIGKILL)", "FAIL_ERROR", "SIGKILL"),
          "oom": ('raise torch.OutOfMemoryError("injected")', "FAIL_OOM", "injected")}


def _fault_in_decode(tmp_path, monkeypatch, action: str) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULT_IN_DECODE.replace("ACTION", action))
    monkeypatch.setenv("PYTHONPATH", str(site))


def _half_written(root: Path) -> list[Path]:
    """Temp files of an atomic write left behind, anywhere under root."""
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_rerun_that_fails_differs_naming_its_verdict(original, tmp_path, monkeypatch, capsys, fault):
    action, verdict, said = FAULTS[fault]
    _fault_in_decode(tmp_path, monkeypatch, action)
    out = tmp_path / "out"
    assert main(["reproduce", str(original), "-o", str(out), "--quiet"]) == 1  # as verify's FAIL
    stdout = capsys.readouterr().out
    assert stdout.startswith(f"DIFFERS: the re-run did not finish: {verdict} in decode: "), stdout
    (rdir,) = out.glob("*/reproduce/*")
    body = json.loads((rdir / "reproduction.json").read_text())
    assert body["verdict"] == "DIFFERS" and body["comparison"] is None
    assert body["rerun"]["verdict"] == verdict and said in body["rerun_fault"]
    assert f"verdict **{verdict}**" in (rdir / "report.md").read_text()
    assert verify(rdir) == [] and verify(rdir / body["rerun"]["path"]) == []
    assert not _half_written(out)


def test_an_interrupted_rerun_leaves_its_interrupted_record_and_exits_130(original, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from conftest import wait_for_phase

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULT_IN_DECODE.replace("ACTION", "time.sleep(3600)"))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "greta", "reproduce", str(original), "-o", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(site)})
    perf = wait_for_phase(out, "decode")  # the re-run's worker, waiting in decode
    assert perf and perf["decode"]["status"] == "running"
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
    stdout, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("greta: INTERRUPTED by SIGINT (Ctrl-C); re-run record: "), err
    (rerun,) = [p.parent for p in out.glob("*/*/*/perf.json")]
    assert lines[0].endswith(str(rerun)) and not stdout
    v = json.loads((rerun / "verdict.json").read_text())
    assert (v["verdict"], v["failed_phase"]) == ("INTERRUPTED", "decode")
    assert verify(rerun) == []  # complete, sealed: the re-run's record of the interrupt
    assert not list(out.glob("*/reproduce")) and not _half_written(out)  # no reproduction record begun
    psutil.wait_procs(workers, timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("stop,code,said", [
    (KeyboardInterrupt(), 130, "greta: INTERRUPTED by SIGINT (Ctrl-C) before the reproduction record was sealed"),
    (OSError(28, "No space left on device"), 2, "could not write the reproduction record")])
def test_a_reproduction_record_stopped_before_its_seal_leaves_nothing(original, tmp_path, monkeypatch, capsys, stop,
                                                                      code, said):
    import greta.record.store

    old = _copy(original, tmp_path, drop_logits=True)  # nothing to compare: written at once, nothing re-run

    def strip(m):
        for row in m["per_position"]:
            del row["fingerprint"]
    _edit_json(old / "metrics.json", strip)
    seal(old)

    def stopped(*args, **kwargs):
        raise stop
    monkeypatch.setattr(greta.record.store, "seal", stopped)  # every file written, the seal not
    assert main(["reproduce", str(old), "-o", str(tmp_path / "out"), "--quiet"]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err, err
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # no record, whole or half


@pytest.mark.slow
def test_a_sweep_reproduces_point_by_point_with_a_line_each(tmp_path, capsys):
    assert main(["sweep", "-f", str(Path(__file__).parent.parent / "params" / "cpu_sweep.yaml"), "-p", "ctx=[256]",
                 "-o", str(tmp_path / "sweeps"), "--quiet"]) == 0
    (sweep,) = tmp_path.glob("sweeps/*/b3_77-sweep/*")
    capsys.readouterr()
    assert main(["reproduce", str(sweep), "-o", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "REPRODUCED: every one of the 2 points reproduced" in out
    for i, point in enumerate(("ctx256-kv0-seed0-bfloat16", "ctx256-kv1-seed0-bfloat16"), 1):
        assert f"reproduce: point {i}/2 {point}: REPRODUCED: every compared bit is equal" in err
    (summary,) = [d for d in tmp_path.glob("out/*/reproduce/*") if "points" in json.loads((d / "reproduction.json").read_text())]
    body = json.loads((summary / "reproduction.json").read_text())
    assert [p["verdict"] for p in body["points"]] == ["REPRODUCED"] * 2
    assert all(verify(summary / p["path"]) == [] for p in body["points"]) and verify(summary) == []


def test_the_notebook_is_committed_clean_with_its_parameters():
    import nbformat

    nb = nbformat.read(Path(__file__).parent.parent / "notebooks" / "reproduce.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    (params,) = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert 'record = ""' in params.source and 'out = ""' in params.source


@pytest.mark.slow
def test_the_notebook_reproduces_a_record(original, tmp_path):
    import papermill as pm

    out = tmp_path / "reproduce.ipynb"
    pm.execute_notebook(str(Path(__file__).parent.parent / "notebooks" / "reproduce.ipynb"), str(out),
                        parameters={"record": str(original), "out": str(tmp_path / "out")}, progress_bar=False)
    text = out.read_text()
    assert "REPRODUCED: every compared bit is equal" in text and "# Reproduction: **REPRODUCED**" in text
    (rdir,) = tmp_path.glob("out/*/reproduce/*")
    assert verify(rdir) == []


# --- the comparison as data (greta.record.reproduction) ---------------------------------------------------------
def test_environment_fields_recorded_absent_and_not_deciding():
    from greta.record.reproduction import environment_differences

    orig = {"device_name": "cpu", "versions": {"torch": "2.13", "triton": "3.9", "numpy": "2.4", "python": "3.11",
                                               "cuda": None, "hip": None}, "model_hash": "h", "prompt": {"prompt_ids_sha256": "p"}}
    here = {**orig, "versions": {**orig["versions"], "numpy": "2.5", "python": "3.12"},
            "machine": {"cpu_model": "X", "blas": "mkl", "gpu_driver": None}}
    env = environment_differences(orig, here, "cpu")
    assert env["differs"] == [] and env["unrecorded"] == ["BLAS", "CPU model"]  # numpy, Python: shown, not deciding
    gpu = environment_differences({**orig, "versions": {**orig["versions"], "cuda": "13.0"}}, here, "cuda")
    assert gpu["differs"] == ["CUDA"] and "GPU driver" in gpu["unrecorded"] and "CPU model" not in gpu["unrecorded"]


def test_logits_are_compared_by_their_bits():
    import numpy as np

    from greta.record.reproduction import compare_logits

    a = {"decode": np.zeros((3, 5), np.float32), "reference": np.ones((3, 5), np.float32)}
    b = {"decode": a["decode"].copy(), "reference": a["reference"].copy()}
    assert compare_logits(a, b)["equal"]
    b["decode"][2, 4] = -0.0  # equal as numbers, not as bits
    b["reference"][1, 0] = np.nextafter(np.float32(1), np.float32(2))
    got = compare_logits(a, b, lambda name, row: "prefill" if (name, row) == ("decode", 0) else name)
    assert not got["equal"] and got["first"]["path"] == "reference" and got["first"]["step"] == 1
    assert got["differing"] == {"decode": 1, "reference": 1} and got["max_abs_diff"] == float(np.spacing(np.float32(1)))
