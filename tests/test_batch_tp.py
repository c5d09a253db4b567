"""The batch probe under tensor parallelism on the CPU (gloo, the tiny-tp preset: 8 heads, 4 KV heads): one
worker per rank, each holding its shard and its KV heads of every request's slab; the one runner's batch step
wrapped in the same TPOps (and exact reduction) as its single-sequence path. At tp=2 and tp=4 with
kv_aligned=1 every request is bit-identical alone, in the batch and in its reference (PASS_BATCH_INVARIANT) in
a record that verifies, with every rank's logits digest equal; the batch-dependent control (batch_split_k)
fails at tp=4, so the check can fail there. (tp=4's runs take about 30 s each on 2 cores: the slow selection.)"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from greta.checks.verify import verify
from greta.probe.preflight import preflight
from greta.probe.runner import run_probe
from greta.record.params import load_params

BATCH_TP = {"probe": "batch", "model": "tiny-tp", "ctx": 96, "gen": 4, "span": 4, "prefill_chunk": 32,
            "kv_block": 32, "batch": 3, "batch_gen": "2,4,3", "sampling_period_s": 0.2, "threads": 1}
CONFIGS = {"tp2": {"tp": 2}, "tp4": {"tp": 4}, "tp4_control": {"tp": 4, "perturb": "batch_split_k"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-tp-records")
    done: dict = {}

    def get(name: str) -> Path:
        if name not in done:
            params = preflight(load_params("params/cpu_default.yaml", {**BATCH_TP, **CONFIGS[name]}))
            t0 = time.monotonic()
            done[name] = Path(run_probe(params, out_root=root, progress=False))
            print(f"{name}: {time.monotonic() - t0:.1f} s")
        return done[name]

    return get


def rj(d: Path, name: str):
    return json.loads((d / name).read_text())


@pytest.mark.parametrize("name,tp", [("tp2", 2), pytest.param("tp4", 4, marks=pytest.mark.slow)])
def test_the_batch_is_invariant_at_every_rank_count(runs, name, tp):
    d = runs(name)
    v, m = rj(d, "verdict.json"), rj(d, "metrics.json")
    assert v["verdict"] == "PASS_BATCH_INVARIANT", v
    assert m["bit_exact"] and m["requests"] == 3 and m["max_abs_diff"] == 0.0, m
    assert rj(d, "params.json")["tp"] == tp
    assert rj(d, "metadata.json")["tp"]["world"] == tp
    assert verify(d) == []


@pytest.mark.slow  # four ranks, about 30 s on 2 cores
def test_the_batch_control_fails_under_tp(runs):
    d = runs("tp4_control")
    v, m = rj(d, "verdict.json"), rj(d, "metrics.json")
    assert v["verdict"] == "FAIL_BATCH_INVARIANT" and not m["bit_exact"], v
    assert m["max_abs_diff"] > 0 and verify(d) == []
