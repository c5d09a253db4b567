"""Hostile strings in every outside-controlled field of every report this repo renders to Markdown.

Each report is rendered from synthetic data with one hostile string in every field a user, a checkpoint or an
exception controls (model, prompt, prompt_file, tokenizer, device name, reasons, paths, ...), converted to HTML
with the converter nbconvert uses (mistune, through nbconvert's markdown2html), and parsed: nothing the string
carried may reach the DOM (no element, no attribute, no link) and its text must stay visible. The same report
rendered with a benign value in those fields is the yardstick for which elements belong to the report itself.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser

import pytest

from nbconvert.filters.markdown_mistune import markdown2html_mistune

from greta.checks import analyze, legacy, oracle
from greta.reports import md
from greta.reports.reproduce_report import render_reproduction
from greta.reports.run_report import fault_report, render_report
from greta.reports import sweep_b3_77, sweep_batch
from greta.sweeps import report as sweep_report

LONG = "L" * 100_000 + "<img src=x onerror=alert(9)>"
HOSTILE = {
    "img": "<img src=x onerror=alert(1)>",
    "script": "<script>alert(1)</script>",
    "textarea": "</textarea><svg onload=alert(1)>x",
    "quotes": "\" onmouseover=\"alert(1)\" x='y'",
    "entity": "&lt;img src=x onerror=alert(1)&gt; &amp; &#60;b&#62;",
    "md_link": "[click](javascript:alert(1))",
    "md_image": "![pwn](http://evil.example/p.png)",
    "autolink": "see https://evil.example/a and <http://evil.example/b> and www.evil.example",
    "heading": "# Heading",
    "list": "- item",
    "ordered": "1. item",
    "quote_block": "> quoted",
    "table": "| a | b |\n|---|---|\n| c | d |",
    "emphasis": "**bold** *it* _em_ __strong__ ~~strike~~",
    "backtick": "a`b",
    "backticks": "``` <img src=x onerror=alert(2)> ```",
    "fence": "```\n<img src=x onerror=alert(3)>\n```",
    "math": "$<img src=x onerror=alert(4)>$ and $$x$$",
    "control": "a\x01b\x1bc\x7fd\re\nf\tg\x85h",
    "long": LONG,
    "rtl": "abc\u202edcba\u2066isolated\u2069 \u200f",
    "unicode": "Ünïcödé ✓ 𝔘𝔫𝔦 \u200b zero-width \ufeff bom \u2028 line-sep",
    "thematic": "***",
    "html_comment": "<!-- x --> after",
}
BENIGN = "plain-value"


class _Dom(HTMLParser):
    """The elements, attributes and visible text of an HTML fragment."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: Counter = Counter()
        self.attrs: set = set()
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        self.attrs |= {(tag, k, v) for k, v in attrs}

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.text.append(data)

    def handle_comment(self, data):
        self.tags["<!--comment-->"] += 1


def _visible_parts(s: str) -> list[str]:
    """The runs of s that must show as text: s split at what md shows visibly (line breaks, control and
    bidi characters), each run cut to its first 200 characters (a very long value is cut with a marker)."""
    parts, cur = [], []
    for ch in s:
        if md.shown_as_code_point(ch):
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip()[:200] for p in parts if p.strip()]


def _check(render, hostile: str):
    """render(value) -> Markdown. Nothing of ``hostile`` reaches the DOM; its text is visible."""
    benign = _Dom(markdown2html_mistune(render(BENIGN)))
    html = markdown2html_mistune(render(hostile))
    dom = _Dom(html)
    extra = dom.tags - benign.tags
    assert not extra, f"elements from the string reached the DOM: {dict(extra)}\n{html[:3000]}"
    # nbconvert gives each heading an id and an anchor link made from its text, percent-encoded: an in-page
    # fragment, not markup; anything else new is the string's
    anchors = {(t, k, v) for t, k, v in dom.attrs - benign.attrs
               if (t in ("h1", "h2", "h3") and k == "id" or t == "a" and k == "href" and v.startswith("#"))
               and not any(c in v for c in "<>\" ")}
    new_attrs = dom.attrs - benign.attrs - anchors
    assert not new_attrs, f"attributes from the string reached the DOM: {sorted(new_attrs)[:10]}"
    assert not any(k.startswith("on") for _, k, _ in dom.attrs)
    text = "".join(dom.text)
    hidden = {ch for ch in hostile if md.shown_as_code_point(ch) and ch not in "\n\r\t"}
    assert not hidden & set(html), f"invisible characters reached the HTML as is: {sorted(map(hex, map(ord, hidden & set(html))))}"
    for part in _visible_parts(hostile):
        assert part in text, f"text {part[:80]!r} is not visible in the rendered report"
        # somewhere as is, not only behind a backslash (an escape that shows is a wrong escape)
        assert re.search(r"(^|[^\\])" + re.escape(part), text), f"text {part[:80]!r} shows only behind a backslash"
    if hostile is LONG:
        assert md.CUT_MARK in text and max(map(len, re.findall("L+", html))) <= md.MAX_CHARS


# --- the reports, each a function of one outside-controlled value ----------------------------------------------
def _run_report(v: str) -> str:
    params = {"probe": "b3_77", "model": v, "device": v, "backend": "torch", "dtype": "bfloat16", "ctx": 32768,
              "gen": 64, "span": 16, "kv_aligned": 1, "seed": 0, "prompt": v, "prompt_file": v, "tokenizer": v,
              "prefill_chunk": 2048, "kv_block": 1024, "perturb": v, "fault": v,
              "timeouts": {"load": 600, "prefill": 600, "decode": 600, "reference": 600, "ceilings": 300},
              "thresholds": {"max_abs_diff": 5e-3, "p99_abs_diff": 1e-3, "top1_agreement": 0.999}}
    meta = {"run_id": v, "commit": v, "dirty": False, "host": v, "started_utc": v, "finished_utc": v,
            "device_name": v, "weights_source": v, "param_count": 1000, "model_hash": v,
            "versions": {"torch": v}, "platform": v}
    perf = {ph: {"status": "ok", "wall_s": 1.0, "timeout_s": 600} for ph in ("ceilings", "load", "prefill")}
    perf["decode"] = {"status": v, "timeout_s": 600, "error": v}
    perf["reference"] = {"status": "not_run"}
    perf["roofline"] = {"available": False, "why": v}
    vs = {"backend": v, "fallback_reason": v, "device_info": v, "sampling_period_sec": 1.0, "samples_count": 3,
          "peak_vram_mb": 100.0, "peak_timestamp_offset_sec": 1.0, "allocator_peaks": {v: {"max_allocated_mb": 1.0}},
          "floor": {"weights_mb": 150.0, "kv_cache_mb": 50.0, "total_mb": 200.0}, "below_floor": True,
          "below_floor_figures": [v]}
    verdict = {"verdict": "FAIL_TIMEOUT", "reason": v, "failed_phase": "decode"}
    return render_report(params, meta, perf, None, vs, verdict)


def _sweep_row(v: str) -> dict:
    return {"name": v, "ctx": 4096, "kv_aligned": 1, "seed": 0, "dtype": v, "exists": True, "complete": False,
            "reasons": [v, v], "verdict": v, "reason": v, "bit_exact": None, "peak_vram_mb": 1.0,
            "max_abs_diff": None, "top1_agreement": None, "prefill_s": 1.0, "prefill_floor_s": None,
            "decode_ms_per_token": None, "decode_floor_ms": None, "floor_mb": 2.0, "device": v}


def _sweep_tables(v: str) -> str:
    # two kv pairs, two seeds: the price-of-exactness table shows seed and dtype
    rows = [_sweep_row(v), dict(_sweep_row(v), kv_aligned=0), dict(_sweep_row(v), kv_aligned=0, seed=v),
            dict(_sweep_row(v), seed=v)]
    cfg = {"sweep_id": v, "matrix_file": v, "created_utc": v, "commit": v, "axes": {"ctx": [v]},
           "base": {"model": v, "device": v}, "point_overrides": {v: v}}
    batch = [dict(r, batch=b) for r, b in zip(rows, (1, 1, 2, 2))]  # the batch probe's section, a B per point
    return "\n\n".join([sweep_report.matrix_md(cfg, rows), sweep_b3_77.results_table_md(rows),
                        sweep_b3_77.timing_table_md(rows), sweep_b3_77.price_of_exactness_md(rows),
                        sweep_batch.table_md(batch), sweep_report.guardrail_md("INCOMPLETE", [v])])


def _oracle_report(v: str) -> str:
    path = {"positions": 8, "max_abs_diff": 0.01, "rel": 0.001, "top1_agreement": 1.0, "limit_rel": 0.01,
            "top1_agreement_decisive": 1.0, "decisive_positions": 8}
    body = {"verdict": "PASS_ORACLE", "backend": v, "kv_aligned": 1, "chunk": 64, "kv_block": 64,
            "versions": {"transformers": v}, "model": v, "ctx": 160, "dtype": "float32", "seed": 0, "card": v,
            "finished_utc": v, "commit": v, "tolerance": {"rel": 0.01, "top1": 0.99}, "prefill": path,
            "decode": path, "control": {"change": v, "prefill": path, "decode": path, "ok": False},
            "checkpoint": {"source": v}, "seconds": {v: 1.0}}
    return oracle.report_md(body)


def _legacy_table(v: str) -> str:
    return legacy.table_md([{"ctx": 256, "kv_aligned": 1, "peak_vram_mb": None, "max_abs_diff": 0.0,
                             "top1_agreement": 1.0, "verdict": v, "seed": v, "layout": v, "status": v}])


def _analyze_report(v: str) -> str:
    return analyze.report_md({"status": v, "verdict": v, "stored_verdict": v, "reasons": [v, v]})


def _fault_report(v: str) -> str:
    perf = {"load": {"status": "ok", "wall_s": 1.0}, "prefill": {"status": v}}
    return fault_report("FAIL_ERROR", v, perf, 3, 100.0, None)


def _reproduce_report(v: str) -> str:
    ref = {"run_id": v, "path": v, "verdict": v}
    env = {"fields": [{"field": v, "original": v, "here": v, "same": False}], "differs": [v], "unrecorded": [v]}
    cmp = {"by": "fingerprints", "positions": 4, "equal": False, "differing": {v: 1},
           "first": {"path": v, "step": 1, "position": 2, "note": v, "top_k": {"rank": 0, "original": [v, 1.0], "here": [v, 2.0]}}}
    return render_reproduction({"verdict": v, "reason": v, "original": ref, "rerun": ref, "environment": env,
                                "comparison": cmp})


REPORTS = {"run_report": _run_report, "fault_report": _fault_report, "sweep_tables": _sweep_tables, "oracle": _oracle_report,
           "legacy": _legacy_table, "analyze": _analyze_report, "reproduce": _reproduce_report}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("report", list(REPORTS))
def test_hostile_string_stays_text(report, name):
    _check(REPORTS[report], HOSTILE[name])


def test_the_check_catches_an_injection():
    """The check can fail: a renderer that pastes the value as is lets the element through."""
    with pytest.raises(AssertionError, match="elements from the string"):
        _check(lambda v: f"Model: {v}", HOSTILE["img"])
    with pytest.raises(AssertionError, match="elements from the string"):
        _check(lambda v: f"Model: `{v}`", "x`<img src=x onerror=alert(1)>`")  # backticks do not protect
    with pytest.raises(AssertionError, match="not visible"):
        _check(lambda v: "Model: (hidden)", HOSTILE["heading"])


@pytest.mark.skipif(not shutil.which("/usr/bin/chromium"), reason="no /usr/bin/chromium on this machine")
def test_headless_chromium_dom_has_no_injected_element(tmp_path):
    page = tmp_path / "report.html"
    body = markdown2html_mistune(_run_report(HOSTILE["img"] + HOSTILE["script"] + HOSTILE["textarea"]))
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{body}</body></html>")
    out = subprocess.run(["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = _Dom(out.stdout)
    assert dom.tags["body"] == 1, out.stderr[-2000:]
    assert not (dom.tags["img"] or dom.tags["script"] or dom.tags["svg"] or dom.tags["textarea"])
    assert not any(k.startswith("on") for _, k, _ in dom.attrs)
    assert "<img src=x onerror=alert(1)>" in "".join(dom.text)
