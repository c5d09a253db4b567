"""greta.reports.run_report.render_report / results_row on hand-made inputs (no probe run): the seed's results table,
failure reports, and the below-the-floor VRAM warning."""
from __future__ import annotations

import pytest

from greta.probe import vram
from greta.record.samples import floor_mb
from greta.record.params import PHASES, load_params
from greta.reports.run_report import render_report, results_row

HEADER = "| Context | KV | Peak VRAM (MiB) | Max Logits Diff | Top-1 Agreement | Verdict |"


class FakeBackend:
    name = "nvml"
    device_info = "Test GPU"
    fallback_reason = None

    def __init__(self, mb: float):
        self.mb = mb

    def used_mb(self) -> float:
        return self.mb

    def close(self):
        pass


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def summary(used_mb: float, cfg, params, allocator=None) -> dict:
    s = vram.VramSampler(FakeBackend(used_mb), period_s=3600, clock=Clock())
    s.start()
    for ph in PHASES:
        s.set_phase(ph)
    s.set_phase(None)
    s.stop()
    floor = floor_mb(cfg, 2, params.ctx + params.gen)
    return vram.summarize(s, allocator or {}, floor)


def meta(**kw):
    return {"run_id": "120000-llama3-8b-ctx32768-kv1-abcd", "commit": "0123456789abcdef" * 2 + "01234567",
            "dirty": False, "host": "testhost", "started_utc": "2026-02-09T12:00:00+00:00",
            "finished_utc": "2026-02-09T12:05:00+00:00", "device_name": "Test GPU", "weights_source": "synthetic",
            "param_count": 8_030_261_248, "model_hash": "sha256:00", "versions": {"torch": "x"},
            "platform": "Linux", **kw}


def perf_ok():
    return {**{ph: {"status": "ok", "wall_s": 1.0, "timeout_s": 600} for ph in PHASES},
            "roofline": {"available": False, "why": "test"}}


def metrics(max_abs=0.0, top1=1.0, bit_exact=True):
    return {"span": 16, "vocab": 128256, "finite": True, "max_abs_diff": max_abs, "p99_abs_diff": max_abs / 2,
            "mean_abs_diff": max_abs / 10, "top1_agreement": top1, "cosine_min": 1.0, "cosine_mean": 1.0,
            "first_argmax_mismatch": None, "bit_exact": bit_exact, "tokens_agree": True, "distinct_argmax": 12,
            "per_position": []}


@pytest.fixture
def gpu_params():
    # b3_77's values; cpu and the torch backend only so it validates on a CPU machine
    return load_params("params/b3_77.yaml", {"device": "cpu", "backend": "torch"})


def table_row(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines.count(HEADER) == 1
    i = lines.index(HEADER)
    assert set(lines[i + 1].replace("|", "")) == {"-"}
    return [c.strip() for c in lines[i + 2].strip("|").split("|")]


def test_results_table_of_a_passing_run(gpu_params):
    from greta.engine.config import PRESETS

    vs = summary(21000.0, PRESETS["llama3-8b"], gpu_params)
    assert not vs["below_floor"]
    verdict = {"verdict": "PASS_EQUIV", "reason": "within thresholds", "failed_phase": None}
    text = render_report(gpu_params.to_dict(), meta(), perf_ok(), metrics(), vs, verdict)
    assert table_row(text) == ["32768", "1", "21000", "0.000000", "1.0000", "PASS_EQUIV"]
    assert "Below the floor" not in text
    assert "Verdict: **PASS_EQUIV**" in text
    assert "bit_exact: **True**" in text


def test_results_row_formats():
    p = {"ctx": 4096, "kv_aligned": 0}
    row = results_row(p, metrics(max_abs=0.0123456, top1=0.9375, bit_exact=False), {"peak_vram_mb": 1234.4},
                      {"verdict": "EXPECTED_DRIFT"})
    assert row == "| 4096 | 0 | 1234 | 0.012346 | 0.9375 | EXPECTED_DRIFT |"


def test_results_row_of_a_failed_run_has_dashes():
    row = results_row({"ctx": 512, "kv_aligned": 1}, None, {"peak_vram_mb": None}, {"verdict": "FAIL_OOM"})
    assert row == "| 512 | 1 | — | — | — | FAIL_OOM |"


def test_below_floor_vram_is_flagged(gpu_params):
    """The seed report's situation: a 17,095 MB peak for Llama-3-8B bf16 weights plus a 32k KV cache."""
    from greta.engine.config import PRESETS

    vs = summary(17095.0, PRESETS["llama3-8b"], gpu_params)
    assert vs["below_floor"] is True
    assert vs["floor"]["total_mb"] > 17095.0
    assert any("17095" in f for f in vs["below_floor_figures"])
    verdict = {"verdict": "PASS_EQUIV", "reason": "within thresholds", "failed_phase": None}
    text = render_report(gpu_params.to_dict(), meta(), perf_ok(), metrics(), vs, verdict)
    assert "Below the floor" in text
    assert "17095" in text
    assert table_row(text)[2] == "17095"


def test_allocator_peak_below_floor_is_flagged(gpu_params):
    from greta.engine.config import PRESETS

    alloc = {"prefill": {"max_allocated_mb": 100.0, "max_reserved_mb": 200.0}}
    vs = summary(30000.0, PRESETS["llama3-8b"], gpu_params, allocator=alloc)
    assert vs["below_floor"] is True
    text = render_report(gpu_params.to_dict(), meta(), perf_ok(), metrics(), vs,
                         {"verdict": "PASS_EQUIV", "reason": "ok", "failed_phase": None})
    assert "Below the floor" in text and "prefill max_allocated_mb" in text


def test_failure_report(gpu_params):
    from greta.engine.config import PRESETS

    vs = summary(21000.0, PRESETS["llama3-8b"], gpu_params)
    perf = perf_ok()
    perf["decode"] = {"status": "timeout", "timeout_s": 600, "error": "decode exceeded its 600 s timeout"}
    perf["reference"] = {"status": "not_run"}
    verdict = {"verdict": "FAIL_TIMEOUT", "reason": "decode: decode exceeded its 600 s timeout; worker killed",
               "failed_phase": "decode"}
    text = render_report(gpu_params.to_dict(), meta(), perf, None, vs, verdict)
    assert table_row(text) == ["32768", "1", "21000", "—", "—", "FAIL_TIMEOUT"]
    assert "**FAIL_TIMEOUT** in phase decode" in text
    assert "Phases completed before the fault: ceilings, load, prefill." in text
    assert "| decode | timeout |" in text
