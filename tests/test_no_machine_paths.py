"""Records name no folder of the machine that made them (greta.paths.record_name): fresh records made on the
CPU under a temporary folder (a B3.77 audit with its notebooks, its reproduction, a batch audit, a sweep) hold
neither that folder's path, nor the checkout's, nor the home directory, in any file; and they still verify,
and the reproduction still links its original."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from greta.checks.verify import verify
from greta.paths import record_argv, record_name
from greta.sweeps.verify import verify_sweep

REPO = Path(__file__).resolve().parent.parent
SMALL = ["-p", "ctx=256", "-p", "gen=8", "-p", "span=4", "-p", "prefill_chunk=64", "-p", "kv_block=128"]
BATCH = ["--batch", "2", "-p", "ctx=128", "-p", "gen=4", "-p", "span=3", "-p", "prefill_chunk=32", "-p", "kv_block=64",
         "-p", "batch_gen="]
SWEEP = ["-f", str(REPO / "params" / "cpu_sweep.yaml"), "-p", "ctx=[256]", "-p", "kv_aligned=[1]"]
BINARY = {".npz", ".png"}
IMAGE = re.compile(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+")  # random letters: they may spell anything


def greta(*args, cwd=REPO):
    r = subprocess.run([sys.executable, "-m", "greta", *args, "--quiet"], cwd=cwd, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """(the out root, the machine's paths a record must not name) after making each kind of record in it."""
    out = tmp_path_factory.mktemp("machine-paths") / "out"
    greta("audit", "-f", str(REPO / "params" / "cpu_default.yaml"), *SMALL, "-o", str(out))  # absolute: argv names it
    (original,) = out.glob("*/b3_77/*")
    greta("reproduce", str(original), "-o", str(out))
    greta("audit", *BATCH, "-o", str(out))
    greta("sweep", *SWEEP, "-o", str(out))
    forbidden = {str(out), str(out.resolve()), str(tmp_path_factory.getbasetemp()), str(REPO), str(REPO.resolve())}
    if Path.home() != Path("/"):  # a home of / would match every path
        forbidden.add(str(Path.home()))
    return out, original, sorted(forbidden)


def _text_files(root: Path):
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix not in BINARY:
            yield p, IMAGE.sub("", p.read_text(encoding="utf-8", errors="replace"))


@pytest.mark.slow
def test_no_file_of_a_fresh_record_names_the_machines_folders(records):
    out, _, forbidden = records
    kinds = {p.parent.name for p in out.glob("*/*/*")}
    assert {"b3_77", "reproduce", "batch", "b3_77-sweep"} <= kinds, kinds
    found = [f"{p.relative_to(out)}: {f}" for p, text in _text_files(out) for f in forbidden if f in text]
    assert found == [], "\n".join(found[:20])


def argv(d: Path) -> list[str]:
    return json.loads((d / "metadata.json").read_text())["argv"]


@pytest.mark.slow
def test_the_records_still_verify_and_say_where_things_are(records):
    out, original, _ = records
    for d in [*out.glob("*/b3_77/*"), *out.glob("*/batch/*"), *out.glob("*/reproduce/*")]:
        assert verify(d) == [], d.name
    (sweep,) = out.glob("*/b3_77-sweep/*")
    assert verify_sweep(sweep) == []
    (rerun,) = [d for d in out.glob("*/b3_77/*") if d != original]  # greta reproduce ran it in its own process
    assert argv(rerun) == ["python", "-m", "greta", "reproduce", original.name, "-o", "../../..", "--quiet"]
    assert argv(original)[:3] == ["ipykernel_launcher.py", "-f", Path(argv(original)[2]).name]  # the run notebook's kernel
    nb = json.loads((original / "run_b3_77.ipynb").read_text())["metadata"]["papermill"]
    assert (nb["input_path"], nb["output_path"], nb["parameters"]["run_dir"]) == (
        "notebooks/run_b3_77.ipynb", "run_b3_77.ipynb", ".")
    (rep,) = out.glob("*/reproduce/*")
    link = json.loads((rep / "reproduction.json").read_text())["original"]
    assert link["run_id"] == original.name and (rep / link["path"]).resolve() == original.resolve()
    sweep_nb = json.loads((sweep / "sweep_report.ipynb").read_text())["metadata"]["papermill"]["parameters"]
    assert sweep_nb["sweep_dir"] == "." and all(r["dir"] == f"points/{r['name']}" for r in sweep_nb["rows"])


def test_record_names(tmp_path):
    record = tmp_path / "out" / "2026-12-05" / "b3_77" / "run"
    site = Path(json.__file__).resolve().parent.parent  # the standard library: an install folder
    assert record_name(record, record) == "." and record_name(record / "a" / "b.json", record) == "a/b.json"
    assert record_name(tmp_path / "out", record) == "../../.."  # the output folder that holds it
    assert record_name(REPO / "notebooks" / "x.ipynb", record) == "notebooks/x.ipynb"
    assert record_name(site / "json" / "decoder.py") == "json/decoder.py"
    assert record_name(tmp_path / "models" / "Llama-3-8B", record) == "Llama-3-8B"  # elsewhere: its name alone
    assert record_argv([str(REPO / "greta" / "__main__.py"), "audit", "-o", str(tmp_path / "out"), "-p",
                        f"prompt_file={tmp_path / 'p.txt'}", "-p", "ctx=64"], record) == [
        "python", "-m", "greta", "audit", "-o", "../../..", "-p", "prompt_file=p.txt", "-p", "ctx=64"]
    assert record_argv([str(REPO / "greta" / "sweeps" / "point.py"), "x"]) == ["python", "-m", "greta.sweeps.point", "x"]
