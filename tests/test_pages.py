"""What every probe kind's pages share: a complete Reproduce command (the same params back, hostile values one
word each) and the coloured verdict badge, whose text stays."""
from __future__ import annotations

import shlex

import pytest

from greta.record.params import load_params, parse_overrides
from greta.reports.memory_section import reproduce_command
from greta.reports.notebooks import verdict_badges


@pytest.mark.parametrize("file", ["cpu_batch.yaml", "cpu_default.yaml", "b3_77.yaml", "llama3_70b_tp4.yaml"])
def test_the_reproduce_command_gives_the_same_params(repo_root, file):
    p = load_params(repo_root / "params" / file)
    cmd = reproduce_command(p.to_dict())
    words = shlex.split(cmd)
    assert words[:3] == ["python", "-m", "greta"] and "<" not in cmd
    assert words[3] == "audit" and set(words[4::2]) <= {"-p"}
    assert load_params(None, parse_overrides(words[5::2])) == p


def test_a_hostile_value_in_the_reproduce_command_stays_one_word():
    p = load_params(None, {"prompt_file": "a b; rm -rf x"})
    words = shlex.split(reproduce_command(p.to_dict()))
    assert "prompt_file=a b; rm -rf x" in words


@pytest.mark.parametrize("verdict,cls", [("PASS_EQUIV", "verdict-pass"), ("PASS_BATCH_INVARIANT", "verdict-pass"),
                                         ("FAIL_OOM", "verdict-fail"), ("EXPECTED_DRIFT", "verdict-drift"),
                                         ("BATCH_DRIFT", "verdict-drift"), ("INTERRUPTED", "verdict-other")])
def test_the_verdict_badge_keeps_its_text(verdict, cls):
    page = verdict_badges(f"<p>Verdict: <strong>{verdict}</strong> — why</p>")
    assert f'<strong class="verdict {cls}">{verdict}</strong>' in page
    assert page.count(verdict) == 1
