"""greta.record.files (the record's files as types, read_record), greta.record.rundir (the one run-directory
allocator) and the preflight size estimate."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from greta.record import files, rundir, store
from greta.record.files import (Manifest, Metrics, Perf, RecordFileError, Verdict, VramSummary, read_json_opt,
                                read_record)
from greta.record.params import load_params

OUT = Path(__file__).resolve().parent.parent / "outputs"
COMMITTED = sorted(p for p in OUT.rglob("*.json") if p.name in files.TYPES)


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(OUT)))
def test_every_committed_record_file_reads_and_writes_back_unchanged(path):
    raw = json.loads(path.read_text())
    typed = files.TYPES[path.name].from_dict(raw)
    assert typed.format == 1
    assert typed.to_dict() == raw


def test_there_are_committed_files_of_every_type():
    assert {p.name for p in COMMITTED} == set(files.TYPES)


def test_read_record_types_every_file(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"seed": 0}))
    (tmp_path / "verdict.json").write_text(json.dumps({"verdict": "PASS_EQUIV", "reason": "r", "bit_exact": True}))
    (tmp_path / "metrics.json").write_text(json.dumps({"max_abs_diff": 0.0, "bit_exact": True, "new_key": 1}))
    (tmp_path / "perf.json").write_text(json.dumps({"load": {"status": "ok", "wall_s": 1.5}, "roofline": {}}))
    (tmp_path / "vram.json").write_text("{not json")
    (tmp_path / "metadata.json").write_text("[1, 2]")
    rec = read_record(tmp_path)
    assert rec.params == {"seed": 0}
    assert isinstance(rec.verdict, Verdict) and rec.verdict.verdict == "PASS_EQUIV" and rec.verdict.bit_exact is True
    assert isinstance(rec.metrics, Metrics) and rec.metrics.max_abs_diff == 0.0 and rec.metrics.extra == {"new_key": 1}
    assert isinstance(rec.perf, Perf) and rec.perf.status("load") == "ok" and rec.perf.phases["load"].wall_s == 1.5
    assert rec.perf.status("decode") is None
    assert rec.vram is None and rec.metadata is None and rec.manifest is None
    assert rec.problems["vram.json"].startswith("vram.json is unreadable: JSONDecodeError")
    assert rec.problems["metadata.json"] == "metadata.json is not a JSON object (got list)"
    assert rec.problems["manifest.json"] == "manifest.json is missing"
    assert all("\n" not in line for line in rec.problem_lines())


def test_a_file_lacking_its_required_key_or_from_a_newer_greta_is_a_problem_not_a_crash(tmp_path):
    (tmp_path / "verdict.json").write_text(json.dumps({"reason": "no verdict key"}))
    (tmp_path / "vram.json").write_text(json.dumps({"format": 2, "backend": "nvml"}))
    rec = read_record(tmp_path)
    assert rec.problems["verdict.json"] == "verdict.json lacks the key(s) verdict"
    assert rec.problems["vram.json"] == "vram.json has format 2; this greta reads format <= 1: update greta"
    with pytest.raises(RecordFileError):
        VramSummary.from_dict({"format": 2})


def test_format_1_files_are_written_without_the_key_and_the_manifest_with_it():
    assert "format" not in Verdict(verdict="PASS_EQUIV").to_dict()
    assert Manifest(files={}).to_dict()["format"] == 1
    assert "hmac" not in Manifest(files={}).to_dict()


def test_read_json_opt_is_none_for_anything_but_an_object(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "b.json").write_text('{"x": 1}')
    assert read_json_opt(tmp_path / "a.json") is None and read_json_opt(tmp_path / "missing.json") is None
    assert read_json_opt(tmp_path / "b.json") == {"x": 1}


def test_record_writes_go_through_the_types(tmp_path):
    rec = store.Record(tmp_path, load_params())
    with pytest.raises(RecordFileError, match="verdict.json lacks the key"):
        rec.write_json("verdict.json", {"reason": "x"})
    rec.write_json("notes.json", {"free": "form"})  # not a record file type: written as given
    assert json.loads((tmp_path / "notes.json").read_text()) == {"free": "form"}


# --- the run-directory allocator ------------------------------------------------------------------------------
def test_allocate_run_dir_names_and_creates_a_fresh_directory(tmp_path):
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    d = rundir.allocate_run_dir(tmp_path, "b3_77", ["/ckpts/llama", "ctx256", "kv1"], now=now)
    assert d.is_dir() and not any(d.iterdir())
    assert d.parent == tmp_path / "2026-01-02" / "b3_77"
    assert d.name.startswith("030405-llama-ctx256-kv1-") and len(d.name.rsplit("-", 1)[1]) == 4


def test_allocate_run_dir_never_reuses_a_directory(tmp_path, monkeypatch):
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    suffixes = iter(["aaaa", "aaaa", "bbbb"])
    monkeypatch.setattr(rundir.secrets, "token_hex", lambda n: next(suffixes))
    first = rundir.allocate_run_dir(tmp_path, "oracle", ["m"], now=now)
    (first / "params.json").write_text("{}")
    second = rundir.allocate_run_dir(tmp_path, "oracle", ["m"], now=now)  # "aaaa" is taken: a new suffix
    assert first.name.endswith("-aaaa") and second.name.endswith("-bbbb")
    assert (first / "params.json").read_text() == "{}"
    monkeypatch.setattr(rundir.secrets, "token_hex", lambda n: "aaaa")
    with pytest.raises(FileExistsError, match="could not allocate a new run directory"):
        rundir.allocate_run_dir(tmp_path, "oracle", ["m"], now=now)


def test_the_default_out_root_is_the_checkouts_outputs(tmp_path, monkeypatch):
    from greta.paths import OUTPUTS

    monkeypatch.chdir(tmp_path)
    assert rundir.resolve_out_root("outputs") == OUTPUTS == rundir.resolve_out_root(None)
    assert rundir.resolve_out_root("elsewhere") == Path("elsewhere")


def test_a_probe_record_gets_its_directory_from_the_allocator(tmp_path, small_params):
    rec = store.Record.create(small_params(), out_root=tmp_path)
    p = small_params()
    assert rec.path.parent.parent.parent == tmp_path and rec.path.parent.name == p.probe
    assert rec.path.name.split("-")[1:-1] == store.probe_name_parts(p)
    again = store.Record.create(small_params(), out_root=tmp_path)
    assert again.path != rec.path


# --- the preflight size estimate ------------------------------------------------------------------------------
def test_the_size_estimate_uses_the_models_vocabulary(tmp_path):
    from greta.engine.config import PRESETS

    tiny = load_params(None, {"model": "tiny", "span": 16})
    big = load_params(None, {"model": "llama3-8b", "span": 16})
    assert PRESETS["tiny"].vocab_size != PRESETS["llama3-8b"].vocab_size
    assert store.expected_bytes(tiny) == 2 * 16 * PRESETS["tiny"].vocab_size * 4 + 16 * 2**20
    assert store.expected_bytes(big) == 2 * 16 * 128256 * 4 + 16 * 2**20
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    hf = {"vocab_size": 7, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 1, "intermediate_size": 16}
    (ckpt / "config.json").write_text(json.dumps(hf))
    assert store.expected_bytes(load_params(None, {"model": str(ckpt), "span": 16})) == 2 * 16 * 7 * 4 + 16 * 2**20
    # a model whose config cannot be read here is sized for the largest vocabulary; the run records the error
    fallback = 2 * 16 * store.FALLBACK_VOCAB * 4 + 16 * 2**20
    assert store.expected_bytes(load_params(None, {"model": str(tmp_path / "nothing"), "span": 16})) == fallback
    # the batch probe keeps span positions of logits per request; a record without logits (an oracle's): none
    batch = load_params(None, {"model": "tiny", "span": 16, "probe": "batch", "batch": 3})
    assert store.expected_bytes(batch) == 2 * 16 * 3 * PRESETS["tiny"].vocab_size * 4 + 16 * 2**20
    assert store.expected_bytes(None) == 16 * 2**20
