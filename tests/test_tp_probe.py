"""The probe under tensor parallelism on the CPU (gloo, the tiny-tp preset: 8 heads, 4 KV heads): one worker
per rank, every phase on every rank. tp=2 and tp=4 with kv_aligned=1 give a bit-exact PASS_EQUIV record that
verifies, with each rank's VRAM (RSS of its process) and figures against its own floor; its negative control,
the library's all_reduce (tp_library_reduce), fails at tp=4; a killed rank is FAIL_ERROR naming it, a hung
rank FAIL_TIMEOUT, an OOM on a rank FAIL_OOM naming it, and none leaves a process behind.

ctx 125, span 4, chunk 64: the reference's compared positions 124..127 lie inside one full 64-row chunk, so
the control compares decode's 1-row reductions with a prefill-sized one (docs/TP.md)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from greta.checks.verify import verify
from greta.probe.preflight import preflight
from greta.probe.runner import run_probe
from greta.record.params import ParamError, PHASES, load_params
from greta.record.samples import read_rank_samples_csv
from greta.record.store import seal
from conftest import wait_for_phase
from tests.test_probe import spawned_children

TP_PROBE = {"model": "tiny-tp", "ctx": 125, "gen": 6, "span": 4, "prefill_chunk": 64, "kv_block": 32,
            "sampling_period_s": 0.2, "threads": 1}
CONFIGS = {
    "tp2": {"tp": 2},
    "tp4": {"tp": 4},
    "tp4_library": {"tp": 4, "perturb": "tp_library_reduce"},
    "killed": {"tp": 2, "fault": "kill:decode@1"},
    "hung": {"tp": 2, "fault": "hang:decode@1", "timeouts.decode": 6},
    "oom": {"tp": 2, "fault": "oom:prefill@1"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(name) -> {"dir", "params", "elapsed_s", "children_after"}; each configuration runs once."""
    root = tmp_path_factory.mktemp("tp-probe-records")
    done: dict = {}

    def get(name: str) -> dict:
        if name not in done:
            params = preflight(load_params("params/cpu_default.yaml", {**TP_PROBE, **CONFIGS[name]}))
            t0 = time.monotonic()
            d = Path(run_probe(params, out_root=root, progress=False))
            done[name] = {"dir": d, "params": params, "elapsed_s": time.monotonic() - t0,
                          "children_after": spawned_children()}
        return done[name]

    return get


def rj(d: Path, name: str):
    return json.loads((d / name).read_text())


@pytest.mark.parametrize("name,tp", [("tp2", 2), ("tp4", 4)])
def test_tp_probe_is_bit_exact_and_verifies(runs, name, tp):
    r = runs(name)
    d = r["dir"]
    v = rj(d, "verdict.json")
    assert (v["verdict"], v["bit_exact"]) == ("PASS_EQUIV", True), v["reason"]
    assert rj(d, "metrics.json")["max_abs_diff"] == 0.0
    assert verify(d) == []
    cli = subprocess.run([sys.executable, "-m", "greta", "verify", str(d)], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert r["children_after"] == []
    meta = rj(d, "metadata.json")
    assert len(meta["worker_pids"]) == tp and meta["worker_pid"] == meta["worker_pids"][0]
    assert meta["tp"] == {"world": tp, "exact": "rank_order"}
    assert meta["config"]["n_kv_heads"] == 4


@pytest.mark.parametrize("name,tp", [("tp2", 2), ("tp4", 4)])
def test_every_rank_is_sampled_and_held_against_its_own_floor(runs, name, tp):
    d = runs(name)["dir"]
    vs = rj(d, "vram.json")
    assert vs["floor"]["tp"] == tp and vs["backend"] == "rss"
    ranks = vs["ranks"]
    assert [x["rank"] for x in ranks] == list(range(tp))
    pids = rj(d, "metadata.json")["worker_pids"]
    for x, pid in zip(ranks, pids):
        assert x["backend"] == "rss" and f"pid {pid}" in x["device_info"]  # each rank's own process
        assert x["peak_vram_mb"] >= vs["floor"]["total_mb"] and not x["below_floor"]
    samples = read_rank_samples_csv(d / "vram_samples_ranks.csv")
    assert sorted(samples) == list(range(tp)) and all(len(s) >= len(PHASES) for s in samples.values())
    perf = rj(d, "perf.json")
    for ph in PHASES:
        assert [x["rank"] for x in perf[ph]["ranks"]] == list(range(tp))
        assert all(x["wall_s"] > 0 for x in perf[ph]["ranks"])
    # the floor is one rank's: its shard of the weights and of the KV heads, below one device's (tp=1) floor
    from greta.engine.config import PRESETS
    from greta.record.samples import floor_for

    params = runs(name)["params"]
    assert vs["floor"] == json.loads(json.dumps(floor_for(params, PRESETS["tiny-tp"])))
    assert vs["floor"]["total_mb"] < floor_for(params.replace(tp=1), PRESETS["tiny-tp"])["total_mb"]


def test_a_rank_below_its_floor_does_not_verify(runs, tmp_path):
    """Negative control of the per-rank floor check: one rank's peak lowered under the floor is caught."""
    d = tmp_path / "low"
    shutil.copytree(runs("tp2")["dir"], d)
    vs = rj(d, "vram.json")
    vs["ranks"][1]["peak_vram_mb"] = vs["floor"]["total_mb"] / 2
    (d / "vram.json").write_text(json.dumps(vs))
    seal(d)
    assert any(x.startswith("rank 1: sampled VRAM peak") for x in verify(d))


def test_the_library_reduce_control_fails_at_tp4(runs):
    """gloo's all_reduce at 4 ranks sums a 1-row message in another order than a 64-row one: the probe's
    negative control under tp is FAIL_EQUIV, with the same ranks, shapes and record as the passing run."""
    d = runs("tp4_library")["dir"]
    v = rj(d, "verdict.json")
    assert v["verdict"] == "FAIL_EQUIV" and v["bit_exact"] is False
    assert rj(d, "metrics.json")["max_abs_diff"] > 0.005
    assert verify(d) == []


def test_a_killed_rank_is_fail_error_naming_it(runs):
    r = runs("killed")
    d = r["dir"]
    v = rj(d, "verdict.json")
    assert v["verdict"] == "FAIL_ERROR" and v["failed_phase"] == "decode"
    assert "rank 1 died with signal 9 (SIGKILL) during decode" in v["reason"]
    assert rj(d, "perf.json")["decode"]["rank"] == 1
    assert verify(d) == []
    assert r["children_after"] == []


def test_a_hung_rank_is_a_timeout_and_every_rank_is_killed(runs):
    r = runs("hung")
    d = r["dir"]
    v = rj(d, "verdict.json")
    assert v["verdict"] == "FAIL_TIMEOUT" and v["failed_phase"] == "decode"
    assert "rank(s) 1" in v["reason"]
    assert r["elapsed_s"] < 60
    assert verify(d) == []
    assert r["children_after"] == []


def test_oom_on_a_rank_is_fail_oom_naming_it(runs):
    r = runs("oom")
    v = rj(r["dir"], "verdict.json")
    assert v["verdict"] == "FAIL_OOM" and v["reason"].startswith("prefill: rank 1: ")
    assert verify(r["dir"]) == []
    assert r["children_after"] == []


def test_ranks_that_disagree_on_the_logits_are_an_error_naming_them():
    """The cross-rank check (each rank's logits sha256 against rank 0's) can fail."""
    from greta.probe.ranks import Workers

    w = Workers([None] * 3, [None] * 3, [None] * 3, ["cpu"] * 3)
    same = {r: {"logits_sha256": "a", "wall_s": 1.0} for r in range(3)}
    assert w._all_done("reference", same)[0] == "ok"
    status, payload, _ = w._all_done("reference", {**same, 2: {"logits_sha256": "b", "wall_s": 1.0}})
    assert status == "error" and "rank(s) 2 differ from rank 0's" in payload["error"]


@pytest.mark.parametrize("over,match", [
    ({"tp": 2, "fault": "kill:decode@2"}, "rank 2 is not one of the tp=2 ranks"),
    ({"tp": 2, "fault": "kill:decode@x"}, r"\[@<rank>\]"),
    ({"tp": 2, "device": "cuda:1"}, "rank r runs on cuda:r"),
])
def test_bad_tp_params_are_one_line(over, match):
    with pytest.raises(ParamError, match=match) as e:
        load_params("params/cpu_default.yaml", {**TP_PROBE, **over})
    assert "\n" not in str(e.value)


# --- what report.md, the VRAM notebook's table and the plot show --------------------------------------------
def test_report_shows_the_tp_degree_and_every_rank(runs):
    d = runs("tp4")["dir"]
    report = (d / "report.md").read_text()
    assert "Tensor parallel: **tp=4**" in report and "-p tp=4" in report
    assert "Analytic floor per rank (tp=4)" in report
    table = report[report.index("### Per rank"):]
    for r, pid in enumerate(rj(d, "metadata.json")["worker_pids"]):
        assert f"| {r} | rss | CPU" in table and f"pid {pid}" in table
    tp1 = (runs("tp2")["dir"] / "report.md").read_text()
    assert "tp=2" in tp1


def test_per_rank_figures_from_outside_are_escaped():
    from greta.reports.memory_section import _rank_table

    hostile = "a|b <script>x</script> *bold*"
    vs = {"ranks": [{"rank": 0, "backend": "nvml", "device_info": hostile, "peak_vram_mb": 10.0,
                     "allocator_peaks": {"decode": {"max_allocated_mb": 9.0}}, "floor_applies": True,
                     "below_floor": False}]}
    text = "\n".join(_rank_table(vs))
    assert "<script>" not in text and "a\\|b" in text and "\\*bold\\*" in text
    row = [ln for ln in text.splitlines() if ln.startswith("| 0 |")][0]
    assert row.replace("\\|", "").count("|") == 7  # six cells: the hostile | did not add one


def test_vram_notebook_table_and_plot_have_every_rank(runs, tmp_path):
    from greta.reports.run_tables import vram_summary_md
    from greta.reports.vram_plot import plot_vram, vram_series

    d = runs("tp4")["dir"]
    md_text = vram_summary_md(d)
    assert "tp=4" in md_text and all(f"rank {r}" in md_text for r in range(4))
    data = vram_series(d)
    assert sorted(data.ranks) == [0, 1, 2, 3] and all(len(ys) > 0 for _, ys in data.ranks.values())
    fig = plot_vram(d, tmp_path / "v.png")
    labels = [h.get_label() for h in fig.legends[0].legend_handles]
    assert [lbl.split(":")[0] for lbl in labels if lbl.startswith("rank ")] == [f"rank {r}" for r in range(4)]
    assert "tp=4" in fig._suptitle.get_text()


def test_an_interrupt_is_interrupted_and_kills_every_rank(tmp_path):
    """Ctrl-C while rank 1 hangs in decode (and rank 0 waits for it in a collective): INTERRUPTED, the record
    verifies, every rank is gone."""
    import signal

    import psutil

    args = [f"-p{k}={v}" for k, v in TP_PROBE.items()]
    proc = subprocess.Popen([sys.executable, "-m", "greta", "probe", "-f", "params/cpu_default.yaml", *args,
                             "-p", "tp=2", "-p", "fault=hang:decode@1", "-o", str(tmp_path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    perf = wait_for_phase(tmp_path, "decode")  # until the ranks are in decode
    assert perf and perf["decode"]["status"] == "running"
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len([p for p in ranks if "spawn_main" in " ".join(p.cmdline())]) >= 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    d = next(tmp_path.glob("*/*/*/perf.json")).parent
    v = rj(d, "verdict.json")
    assert v["verdict"] == "INTERRUPTED" and v["failed_phase"] == "decode"
    assert verify(d) == []
    psutil.wait_procs(ranks, timeout=10)
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _stuck_in_teardown(conn):
    """A rank that takes "exit" and then never leaves (as destroy_process_group hung in the issue's scout)."""
    conn.recv()
    time.sleep(600)


def test_a_rank_stuck_in_teardown_is_killed():
    import multiprocessing as mp

    from greta.probe.ranks import Workers

    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [ctx.Process(target=_stuck_in_teardown, args=(child,), daemon=True) for _, child in pipes]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    Workers(procs, [parent for parent, _ in pipes], [None, None], ["cpu", "cpu"]).stop(graceful=True, teardown_s=1.0)
    assert all(p.exitcode == -9 for p in procs) and time.monotonic() - t0 < 15


def test_the_root_cause_rule_names_the_cause_not_the_peer_that_saw_it():
    """A rank's error seen through a collective gives way to a peer's death, an OOM or an error; a collective
    timeout alone makes the ranks that never answered the hung ones (FAIL_TIMEOUT)."""
    from greta.probe.ranks import Workers

    w = Workers([None] * 4, [None] * 4, [None] * 4, ["cpu"] * 4)
    lost = ("error", {"error": "RuntimeError: Connection reset by peer"})
    waited = ("error", {"error": "RuntimeError: gloo Timed out waiting", "collective_timeout": True})
    dead = ("crash", {"error": "rank 3 died with signal 9 (SIGKILL) during decode", "rank": 3})
    oom = ("oom", {"error": "OutOfMemoryError: boom"})
    assert w._root_cause("decode", {0: lost, 3: dead}, {}) == dead
    status, payload = w._root_cause("decode", {0: waited, 2: oom}, {})
    assert status == "oom" and payload["rank"] == 2 and payload["error"] == "rank 2: OutOfMemoryError: boom"
    assert w._root_cause("decode", {1: lost, 0: waited}, {})[1]["error"].startswith("rank 1: RuntimeError")
    status, payload = w._root_cause("decode", {0: waited}, {1: {}})
    assert status == "timeout" and payload["ranks_running"] == [2, 3] and "rank(s) 2, 3 did not answer" in payload["error"]


def test_a_checkpoint_loads_shard_by_shard_under_the_probe(tmp_path):
    """model=<checkpoint dir> at tp=2: each rank loads its shard (source.load_model(shard=...)), the record names the files'
    hash, and decode reproduces prefill bit for bit."""
    import torch

    from greta.engine.config import PRESETS
    from greta.engine.weights import checkpoint_hash, save_checkpoint, synthetic

    cfg = PRESETS["tiny-tp"]
    path = save_checkpoint(synthetic(cfg, 1, torch.bfloat16, "cpu"), cfg, tmp_path / "ckpt")
    params = preflight(load_params("params/cpu_default.yaml", {**TP_PROBE, "model": str(path), "tp": 2}))
    d = Path(run_probe(params, out_root=tmp_path / "out", progress=False))
    v = rj(d, "verdict.json")
    assert (v["verdict"], v["bit_exact"]) == ("PASS_EQUIV", True), v["reason"]
    meta = rj(d, "metadata.json")
    assert meta["weights_source"] == "checkpoint" and meta["model_hash"] == checkpoint_hash(str(path))
    assert verify(d) == [] and spawned_children() == []


@pytest.mark.slow
@pytest.mark.parametrize("rank", range(4))
def test_a_hung_rank_is_named_at_every_position(tmp_path, rank):
    """fault=hang:decode@R at 4 ranks: the other ranks' collectives time out or lose their peer, and the record
    is FAIL_TIMEOUT naming rank R alone (not a peer's 'Connection closed by peer' as FAIL_ERROR)."""
    params = preflight(load_params("params/cpu_default.yaml", {
        **TP_PROBE, "tp": 4, "fault": f"hang:decode@{rank}", "timeouts.decode": 8, "timeouts.load": 16,
        "timeouts.prefill": 16, "timeouts.reference": 16}))
    d = Path(run_probe(params, out_root=tmp_path, progress=False))
    v = rj(d, "verdict.json")
    assert v["verdict"] == "FAIL_TIMEOUT" and v["failed_phase"] == "decode", v
    assert v["reason"].startswith(f"decode: rank(s) {rank} did not answer"), v["reason"]
    assert verify(d) == []
