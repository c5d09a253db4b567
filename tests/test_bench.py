"""bench/bench_b3_77.py's arithmetic and report on the CPU (the timing itself needs a GPU): the price of
exactness and kv0-vs-peer ratios, the Markdown (outside strings escaped), and a failing peer recorded as
one line while the rest goes on."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
bench = pytest.importorskip("bench_b3_77")
import bench_peers  # noqa: E402


def _pt(engine, ctx, kv, pre, dec):
    return {"engine": engine, "ctx": ctx, "kv_aligned": kv, "prefill_s": pre, "decode_ms_per_token": dec,
            "peak_allocated_gib": 20.0, "prefill_roofline_ratio": 1.5, "decode_roofline_ratio": 1.3,
            "weights_plus_kv_gib": 19.0}


POINTS = [_pt("greta-triton", 4096, 1, 0.11, 7.2), _pt("greta-torch", 4096, 0, 0.10, 6.0),
          _pt("greta-triton", 32768, 1, 1.45, 8.3), _pt("greta-torch", 32768, 0, 1.25, 7.0),
          _pt("hf-eager", 32768, None, 1.42, 51.0), _pt("hf-static", 32768, None, 1.38, 22.9),
          _pt("greta-triton", 131072, 1, 13.0, 12.9)]  # no kv0 point at 128k: no ratio there


def test_price_of_exactness_and_peers():
    price = bench.ratios(POINTS, "kv1", "kv0")
    assert [r["ctx"] for r in price] == [4096, 32768]
    assert price[1]["prefill"] == pytest.approx(1.45 / 1.25) and price[1]["decode"] == pytest.approx(8.3 / 7.0)
    peer = bench.ratios(POINTS, "kv0", "peer")  # the fastest peer per phase: hf-static 1.38 s, 22.9 ms
    assert peer == [{"ctx": 32768, "prefill": pytest.approx(1.25 / 1.38), "decode": pytest.approx(7.0 / 22.9)}]
    # negative control: the ratio reads the numbers (a slower kv0 shows up above 1)
    slow = [dict(p, prefill_s=2.9) if p["engine"] == "greta-torch" else p for p in POINTS]
    assert bench.ratios(slow, "kv1", "kv0")[1]["prefill"] < 1 < bench.ratios(slow, "kv0", "peer")[0]["prefill"]


def test_markdown_escapes_outside_strings():
    doc = {"model": "llama3-8b", "card": "NVIDIA H100 80GB HBM3", "date": "2026-11-26", "gen": 32, "chunk": 2048,
           "ceilings": {"matmul_tflops": 791.0, "copy_gbps": 2960.0}, "points": POINTS,
           "price_of_exactness": bench.ratios(POINTS, "kv1", "kv0"), "kv0_vs_best_peer": bench.ratios(POINTS, "kv0", "peer"),
           "attention": [{"kernel": "sdpa-cudnn", "ctx": 32768, "start": 0, "rows": 32768, "ms": 1.0, "tflops": 600.0}],
           "failures": [{"peer": "hf-static ctx 131072", "error": "OutOfMemoryError: a | b <script>"}]}
    text = bench.render_md(doc)
    assert "| 32768 | 1.160 | 1.186 |" in text  # the price-of-exactness row
    assert "a \\| b &lt;script&gt;" in text and "<script>" not in text
    assert "Price of exactness" in text and "sdpa-cudnn" in text


def test_a_failing_peer_is_one_line_and_the_rest_runs():
    failures, ran = [], []

    def boom():
        raise ImportError("cannot import name 'StaticCache'\n  from transformers")

    assert bench_peers.attempt("hf-static ctx 4096", failures, boom) is None
    assert bench_peers.attempt("next", failures, lambda: ran.append(1) or 7) == 7
    assert failures == [{"peer": "hf-static ctx 4096",
                         "error": "ImportError: cannot import name 'StaticCache' from transformers"}] and ran == [1]
