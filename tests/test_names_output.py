"""Names and terminal output from outside text (issue 24, rows D8 to D11): run ids bounded and safe, every
print of greta's through greta.terminal.shown, `-o` inside a record refused, long values shortened in error
messages without losing the reason.

One probe runs on a checkpoint directory whose name is 250 characters long and carries escape sequences, a
carriage return and a bidi override, into an output folder whose name carries more of them."""
from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from greta.__main__ import main as cli
from greta.checks.verify import verify
from greta.record import rundir
from greta.terminal import brief, echo, shown

from conftest import REPO_ROOT

HOSTILE = "\x1b[31mred\r\x1b]0;TITLE\x07\u202eevil\n"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")  # what a terminal acts on
PROBE = ["-p", "ctx=128", "-p", "gen=8", "-p", "span=4", "-p", "prefill_chunk=64", "-p", "kv_block=128",
         "-p", "sampling_period_s=0.2", "--quiet"]


@pytest.fixture(scope="module")
def probed(hf_checkpoint, tmp_path_factory):
    """(checkpoint dir, out root, record dir, the CLI's stdout) of one probe under hostile names."""
    base = tmp_path_factory.mktemp("names")
    model = base / (HOSTILE + "c" * (250 - len(HOSTILE)))
    assert len(model.name) == 250 and len(model.name.encode()) <= 255
    shutil.copytree(hf_checkpoint("names"), model)
    out = base / ("out" + HOSTILE.replace("\n", ""))
    cap = _Capture()
    with cap:
        rc = cli(["probe", "-p", f"model={model}", "-o", str(out), *PROBE])
    assert rc == 0, cap.err
    records = [p.parent for p in out.rglob("manifest.json")]
    assert len(records) == 1
    return model, out, records[0], cap.out


class _Capture:
    """stdout and stderr of an in-process CLI call (a module fixture cannot use capsys)."""

    def __enter__(self):
        import io

        self._saved, (sys.stdout, sys.stderr) = (sys.stdout, sys.stderr), (io.StringIO(), io.StringIO())

    def __exit__(self, *exc):
        self.out, self.err = sys.stdout.getvalue(), sys.stderr.getvalue()
        sys.stdout, sys.stderr = self._saved


# --- D8: long names ------------------------------------------------------------------------------------------
def test_a_250_character_model_name_gives_a_bounded_run_id(probed):
    model, out, rec, _ = probed
    assert len(rec.name) <= rundir.MAX_STEM + 5
    assert re.fullmatch(r"\d{6}-[A-Za-z0-9._+=~-]+-ctx128-kv1-[0-9a-f]{4}", rec.name), rec.name
    assert verify(rec) == []


def test_long_parts_keep_the_other_parts_and_differ_by_hash():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    a = rundir.run_stem(now, ["/ckpt/" + "a" * 250 + "x", "ctx256", "kv1"])
    b = rundir.run_stem(now, ["/ckpt/" + "a" * 250 + "y", "ctx256", "kv1"])
    assert a != b and a.endswith("-ctx256-kv1") and len(a) <= rundir.MAX_STEM
    assert re.fullmatch(r"030405-a+~[0-9a-f]{8}-ctx256-kv1", a)
    many = rundir.run_stem(now, ["b" * 200] * 6)
    assert len(many) <= rundir.MAX_STEM and re.search(r"~[0-9a-f]{8}$", many)
    assert rundir.run_stem(now, ["llama3-8b", "ctx4096", "kv0"]) == "030405-llama3-8b-ctx4096-kv0"  # unchanged


def test_a_failed_allocation_leaves_no_empty_day_or_kind_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.secrets, "token_hex", lambda n: "z" * 300)  # a run dir name the filesystem refuses
    with pytest.raises(OSError):
        rundir.allocate_run_dir(tmp_path, "b3_77", ["m"])
    assert list(tmp_path.iterdir()) == []


# --- D9: control characters ----------------------------------------------------------------------------------
def test_shown_escapes_what_a_terminal_would_act_on():
    s = shown(HOSTILE + "\u2066x\u2069\u200b\ufeff\udcff\x85 ok Ünïcödé ✓")
    assert not RAW.search(s) and "\n" not in s
    assert s.startswith("\\x1b[31mred\\x0d\\x1b]0;TITLE\\x07\\u202eevil\\x0a")
    assert "\\udcff" in s and "\\x85" in s and s.endswith(" ok Ünïcödé ✓")
    assert shown("plain text / path-1.2") == "plain text / path-1.2"
    assert shown("a\nb\x1b", lines=True) == "a\nb\\x1b"


def test_the_probe_prints_its_record_line_escaped(probed):
    _, out, rec, stdout = probed
    assert not RAW.search(stdout), repr(stdout)
    assert f"record: {shown(rec)}" in stdout.splitlines()
    assert "\\x1b[31mred\\x0d\\x1b]0;TITLE\\x07\\u202eevil" in stdout


def test_verify_prints_ok_escaped(probed, capsys):
    rec = probed[2]
    assert cli(["verify", str(rec)]) == 0
    text = capsys.readouterr().out
    assert text == f"OK {shown(rec)}\n" and not RAW.search(text)
    assert cli(["analyze", str(rec)]) == 0
    assert not RAW.search(capsys.readouterr().out)


def test_sweep_lines_are_escaped(tmp_path, monkeypatch, capsys):
    from greta.sweeps import sweep

    d = tmp_path / ("sweep" + HOSTILE)
    d.mkdir()
    (d / sweep.VERDICT).write_text(json.dumps({"verdict": "PASS_GUARDRAIL", "reasons": [HOSTILE],
                                               "report_html": "r" + HOSTILE + ".html"}))
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: d)
    assert cli(["sweep", "-f", "params/b3_76.yaml", "-o", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert not RAW.search(text), repr(text)
    lines = text.splitlines()
    assert len(lines) == 3 and lines[1].startswith("sweep: ") and lines[2].startswith("report: ")


@pytest.mark.slow
def test_the_audit_notebooks_print_outside_text_escaped(tmp_path, capsys):
    out = tmp_path / ("out" + HOSTILE.replace("\n", ""))
    assert cli(["audit", "-p", "model=tiny", "-o", str(out), *PROBE]) == 0, capsys.readouterr().err
    (rec,) = [p.parent for p in out.rglob("manifest.json")]
    assert verify(rec) == []
    nb = json.loads((rec / "run_b3_77.ipynb").read_text())
    stdout = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []) if o.get("name") == "stdout")
    # the page names the record by <day>/<probe>/<id> (no machine path), so the hostile folder is not echoed there;
    # nothing raw may reach the stdout cell or the page all the same
    assert f"record: {shown(Path(*rec.parts[-3:]))}" in stdout and not RAW.search(stdout), repr(stdout)
    html = (rec / "run_b3_77.html").read_text()
    assert "ansi-red-fg" not in html and "\u202e" not in html and "\x1b" not in html


def _unshown_prints(tree) -> list[int]:
    """Line numbers of print(...) calls with an argument that is neither a constant nor shown(...)."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
            for a in node.args:
                if not (isinstance(a, ast.Constant) or (isinstance(a, ast.Call) and getattr(a.func, "id", None) == "shown")):
                    bad.append(node.lineno)
        if isinstance(node, ast.Attribute) and node.attr == "write" and getattr(node.value, "attr", None) in ("stdout", "stderr"):
            bad.append(node.lineno)
    return bad


def test_every_print_goes_through_shown():
    bad = []
    for p in sorted((REPO_ROOT / "greta").rglob("*.py")):
        bad += [f"{p.relative_to(REPO_ROOT)}:{n}" for n in _unshown_prints(ast.parse(p.read_text()))]
    for p in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(p.read_text())["cells"]):
            if cell["cell_type"] == "code":
                bad += [f"{p.name} cell {i}" for _ in _unshown_prints(ast.parse("".join(cell["source"])))]
    assert not bad, "prints of outside text not through greta.terminal.shown: " + ", ".join(bad)


# --- D10: nesting --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["probe", "audit"])
@pytest.mark.parametrize("where", [".", "sub/dir"])
def test_o_inside_a_record_is_refused_in_one_line(probed, tmp_path, capsys, cmd, where):
    rec = probed[2]
    copy = tmp_path / "r" / rec.name  # a copy, so a regression cannot spoil the shared record
    shutil.copytree(rec, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    assert cli([cmd, "-p", "model=tiny", "-o", str(copy / where), *PROBE]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "lies inside the record" in err and "pass -o <a folder outside" in err, err
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
    assert verify(copy) == []


def test_a_sweep_or_oracle_inside_a_record_is_refused(probed, capsys):
    rec = probed[2]
    assert cli(["sweep", "-f", "params/b3_76.yaml", "-o", str(rec)]) == 2
    assert cli(["oracle", "--model", "tiny", "-o", str(rec)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("lies inside the record" in line for line in err), err


def test_the_allocator_refuses_a_root_inside_a_record(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(rundir.NestedRecordError, match="lies inside the record"):
        rundir.allocate_run_dir(tmp_path / "deeper", "b3_77", ["m"])
    assert not (tmp_path / "deeper").exists()


# --- D11: lost reasons ---------------------------------------------------------------------------------------
def test_a_10000_character_model_path_keeps_its_reason(capsys):
    assert cli(["probe", "-p", "model=/tmp/" + "m" * 10_000, *PROBE]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and len(err) < 400, err
    assert "(10007 chars)" in err and err.rstrip().endswith("a checkpoint directory with config.json, nor a .gguf file")


def test_a_long_out_root_keeps_its_reason(tmp_path, capsys):
    (tmp_path / "f").write_text("a file, not a folder")
    assert cli(["probe", "-o", str(tmp_path / "f") + "/" + "o" * 10_000, *PROBE]) == 2
    err = capsys.readouterr().err
    assert len(err) < 400 and "records go under a folder" in err, err


def test_brief_shortens_the_longest_words_first():
    reason = "no such file: give a checkpoint directory"
    line = brief("param model=" + "x" * 5000 + " " + reason)
    assert line.endswith(reason) and len(line) <= 300
    assert brief("short message") == "short message"
    many = brief(" ".join(["word"] * 199) + " end")  # many short words: the middle is cut, the end stays
    assert len(many) <= 300 and many.endswith("word end") and " ... " in many
    assert echo("p" * 1000).startswith("'ppp") and "(1002 chars)" in echo("p" * 1000) and len(echo("p" * 1000)) <= 120
    assert echo("/a/short/path") == "'/a/short/path'"
