"""Shared fixtures for the engine, params, probe, report and audit tests.

Everything here runs on the CPU with the `tiny` preset and small contexts, so the whole suite stays
fast on a 2-core CI machine.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys

# On a machine without a GPU the Triton kernels can only run under Triton's interpreter, and TRITON_INTERPRET is
# read once, when greta.kernels is first imported. Each kernel test module sets it at its own import, but pytest
# imports every module at collection, so a module collected earlier that imports greta.kernels (through the
# engine) would leave the kernels compiled-mode and every interpreter test skipped. Setting it here, before any
# test module, makes the CPU suite run them in any order. A GPU machine keeps compiled kernels.
if not any(os.path.exists(dev) for dev in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")):
    os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import pytest

# --- nothing left behind ------------------------------------------------------------------------------------
# The suite must leave no file outside pytest's tmp_path: no kernel connection file (it holds the kernel's HMAC
# key), no figure folder, no fuzz file, no compiler cache (Triton's in ~/.triton; TorchInductor's, which any
# import of torch._dynamo makes in $TMPDIR). Watching /tmp for new names would not be reliable: other processes
# on the machine write there at the same time, and under xdist (-n 2) each worker ends on its own schedule. So
# the controlling process points TMPDIR and both caches at folders of its own under pytest's basetemp before
# any test runs: xdist starts its workers after pytest_configure, so they inherit that environment, as does
# every subprocess a test starts (greta audit, papermill, notebook kernels, nested pytest runs). At the end,
# once xdist has shut every worker down (their exit handlers have run), the controller fails the session if
# anything but pytest's own basetemp folders (a nested pytest run's) is left in that TMPDIR, naming each. (In a
# run without xdist the tests share the controller's process, whose exit handlers run after the check: a test
# there must clean up before it ends, not at exit.)
SESSION_TMP_ENV = "GRETA_TEST_SESSION_TMPDIR"


@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin has made config._tmp_path_factory
def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: the controller set the environment it inherited
        return
    import tempfile

    base = config._tmp_path_factory.getbasetemp()
    tmp = base / "tmpdir"
    tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = os.environ[SESSION_TMP_ENV] = str(tmp)
    os.environ["TRITON_CACHE_DIR"] = str(base / "triton-cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "torchinductor-cache")
    tempfile.tempdir = str(tmp)  # this process read TMPDIR already (pytest's basetemp)


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session, exitstatus):
    result = yield  # xdist's own sessionfinish (it waits for every worker to exit) has run by now
    tmp = os.environ.get(SESSION_TMP_ENV)
    if hasattr(session.config, "workerinput") or not tmp or not os.path.isdir(tmp):
        return result
    left = sorted(p for p in Path(tmp).iterdir() if not p.name.startswith("pytest-of-"))
    if left:
        lines = [f"the test session left {len(left)} file(s) in its TMPDIR {tmp} (a test or the code it runs "
                 "does not clean up):", *(f"  {p.name}" for p in left)]
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
        for line in lines:
            if reporter is not None:
                reporter.write_line(line, red=True)
            else:
                print(line, file=sys.stderr)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result


REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_PARAMS = REPO_ROOT / "params" / "cpu_default.yaml"

# A complete but quick probe run on a 2-core CPU (awkward ctx/chunk/block combinations are test_engine.py's job).
SMALL_PROBE = {"ctx": 256, "gen": 8, "span": 4, "prefill_chunk": 64, "kv_block": 128, "sampling_period_s": 0.2}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_cfg():
    from greta.engine.config import PRESETS

    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_weights(tiny_cfg):
    """tiny_weights(dtype=torch.bfloat16, seed=0) -> synthetic CPU weights (cached per session; do not mutate)."""
    import torch

    from greta.engine.weights import synthetic

    cache: dict = {}

    def get(dtype=torch.bfloat16, seed: int = 0):
        key = (dtype, seed)
        if key not in cache:
            cache[key] = synthetic(tiny_cfg, seed, dtype, "cpu")
        return cache[key]

    return get


@pytest.fixture(scope="session")
def small_params():
    """small_params(**overrides) -> validated params: params/cpu_default.yaml + SMALL_PROBE + overrides."""
    from greta.record.params import load_params

    def make(**overrides):
        return load_params(CPU_PARAMS, {**SMALL_PROBE, **overrides})

    return make


def record_files_from_doc() -> list[str]:
    """File names in the first column of docs/RECORD.md's table (backticked), in order.
    `.html` ("and `.html` of each") is not a file name of its own and is left out."""
    names = []
    for line in (REPO_ROOT / "docs" / "RECORD.md").read_text().splitlines():
        if line.startswith("| `"):
            names += [n for n in re.findall(r"`([^`]+)`", line.split("|")[1]) if not n.startswith(".")]
    return names


@pytest.fixture(scope="session")
def record_doc_files() -> list[str]:
    return record_files_from_doc()


# --- real-model checkpoints saved by transformers itself (tests of checkpoints, GGUF, oracle) -------------
HF_SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rope_theta=10000.0)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(name, shard=None, seed=None, **LlamaConfig overrides) -> directory of a random
    LlamaForCausalLM saved by transformers (safetensors; sharded when shard is a max_shard_size such as
    '40KB'; seeded by the name unless seed is given). Cached per session by name: don't modify the
    directory (copy it first)."""
    pytest.importorskip("transformers")
    from greta.checks.oracle import make_checkpoint

    made: dict = {}

    def make(name: str, shard: str | None = None, seed: int | None = None, **overrides):
        if name not in made:
            d = tmp_path_factory.mktemp(f"hf-{name}")
            made[name] = make_checkpoint({**HF_SMALL, **overrides}, d, sum(map(ord, name)) if seed is None else seed,
                                         shard=shard)
        return made[name]

    return make


def wait_for_phase(out_root: Path, phase: str, timeout_s: float = 120.0) -> dict | None:
    """Poll the first probe record under out_root until its perf.json says phase is running (a test about to
    interrupt or kill a probe mid-phase); -> that perf.json, or the last one read (None: none written) at the
    timeout."""
    import json
    import time

    deadline, perf = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        found = list(out_root.glob("*/*/*/perf.json"))
        if found:
            perf = json.loads(found[0].read_text())
            if perf[phase]["status"] == "running":
                break
        time.sleep(0.2)
    return perf



@contextlib.contextmanager
def own_ray_tmpdir():
    """Every file of the Ray sessions started inside it (and by the subprocesses started inside it) goes to a
    folder of its own, removed after. Ray's default is <TMPDIR>/ray, one folder for both xdist workers (they share
    TMPDIR): its session files and its `ray_current_cluster` address file were shared, and one worker's teardown,
    which removed the folder, pulled them from under the other worker's live cluster (its sweep could not join).
    The folder is under /tmp, not TMPDIR: Ray's socket paths under pytest's TMPDIR are already within a few
    bytes of the 107-byte limit on a Unix socket's name. RAY_TMPDIR is read whenever Ray needs the folder."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="greta-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = d
    try:
        yield Path(d)
    finally:
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(d, ignore_errors=True)
