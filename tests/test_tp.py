"""Tensor parallelism on the CPU (gloo): shards of the synthetic weights that do not depend on tp, checkpoint
shards, and the probe's property under tp=2 and tp=4 -- decode logits equal teacher-forced prefill logits bit
for bit with the exact (rank-order) reduction -- with its negative control: the library's all_reduce in both
paths, which gloo at 4 ranks sums in a size-dependent order, so decode (1 row) differs from prefill (a
64-row chunk). Measured here: gloo's bf16 all_reduce at 4 ranks gives rows that differ by up to 0.25 between
a 1-row and a 64-row message even at hidden 128 (tests/test_dist.py measures the reduction alone)."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from greta.engine.config import ModelConfig
from greta.engine.dist import library_all_reduce
from greta.engine.launch import SpawnError, finish, init_from_env, spawn
from greta.engine.ops.controls import TPLibraryReduce
from greta.engine.prompt import synthetic_prompt
from greta.engine.runner import Runner
from greta.engine.source import load_model
from greta.engine.tp import check_divides, shard_weights, synthetic_shard
from greta.engine.weights import save_checkpoint, synthetic

# the tiny preset's family with 4 KV heads, so tp=4 splits them (tiny has 1)
CFG = ModelConfig(name="tiny-tp", vocab_size=2048, hidden_size=128, n_layers=2, n_heads=8, n_kv_heads=4,
                  head_dim=16, intermediate_size=384, rope_theta=500000.0, rms_eps=1e-5)
CTX, STEPS, CHUNK, KV_BLOCK = 70, 4, 64, 32  # decode at 70..73: inside the second 64-row tile
DECODE_POS = list(range(CTX, CTX + STEPS))


# --- weights ---------------------------------------------------------------------------------------------
def _unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full fused tensor from its shards in rank order (the inverse of tp.shard_tensor)."""
    if name.endswith("wqkv"):
        kv = CFG.n_kv_heads * CFG.head_dim // len(shards)
        parts = [s.split([s.shape[0] - 2 * kv, kv, kv]) for s in shards]
        return torch.cat([torch.cat([p[i] for p in parts]) for i in range(3)])
    if name.endswith("w13"):
        parts = [s.chunk(2) for s in shards]
        return torch.cat([torch.cat([p[i] for p in parts]) for i in range(2)])
    if name.endswith(("wo", "w2")):
        return torch.cat(shards, dim=1)
    if name == "lm_head":
        return torch.cat(shards)
    assert all(torch.equal(s, shards[0]) for s in shards), name  # replicated
    return shards[0]


@pytest.mark.parametrize("world", [2, 4])
def test_synthetic_shards_concatenate_to_the_tp1_weights(world):
    full = synthetic(CFG, 5, torch.bfloat16, "cpu")
    shards = [synthetic_shard(CFG, 5, torch.bfloat16, "cpu", r, world) for r in range(world)]
    assert shards[0]["0.wqkv"].shape[0] == (CFG.n_heads + 2 * CFG.n_kv_heads) * CFG.head_dim // world
    for name, t in full.items():
        assert torch.equal(_unshard(name, [s[name] for s in shards]), t), name


def test_the_weights_check_sees_a_misplaced_shard():
    """Negative control: swapping two ranks' shards of one tensor is caught."""
    full = synthetic(CFG, 5, torch.bfloat16, "cpu")
    shards = [synthetic_shard(CFG, 5, torch.bfloat16, "cpu", r, 2) for r in range(2)]
    assert not torch.equal(_unshard("1.wo", [shards[1]["1.wo"], shards[0]["1.wo"]]), full["1.wo"])


def test_tp_must_divide_the_heads():
    with pytest.raises(ValueError, match="tp=8 does not divide n_kv_heads=4"):
        check_divides(CFG, 8)


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_loads_shard_by_shard(tmp_path, tied):
    cfg = replace(CFG, tie_embeddings=tied)
    full = synthetic(cfg, 2, torch.float32, "cpu")
    path = save_checkpoint(full, cfg, tmp_path / "ckpt")
    for r in range(4):
        got = load_model(str(path), 0, torch.float32, "cpu", shard=(r, 4)).weights
        want = shard_weights(cfg, full, r, 4)
        assert got["lm_head"].shape[0] == cfg.vocab_size // 4
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (r, k)


def test_gguf_loads_shard_by_shard(tmp_path):
    pytest.importorskip("gguf")
    from tests.test_gguf import write_gguf  # noqa: PLC0415 - the GGUF tests' writer

    full = synthetic(CFG, 2, torch.float32, "cpu")
    path, _ = write_gguf(tmp_path / "m.gguf", save_checkpoint(full, CFG, tmp_path / "ckpt"))
    for r in range(2):
        got = load_model(str(path), 0, torch.float32, "cpu", shard=(r, 2)).weights
        want = shard_weights(CFG, full, r, 2)
        for k in want:
            assert torch.equal(got[k], want[k]), (r, k)


@pytest.mark.parametrize("kind", ["Q4_1", "Q5_1"])
def test_quantized_gguf_shards_are_slices_of_the_whole_load(tmp_path, kind):
    """A quantized file (blocks along rows) loads shard by shard: each rank's tensors are its slices of tp=1's."""
    gguf = pytest.importorskip("gguf")
    from greta.engine.gguf import load_gguf  # noqa: PLC0415
    from tests.test_gguf import write_gguf  # noqa: PLC0415 - the GGUF tests' writer

    full = synthetic(CFG, 3, torch.float32, "cpu")
    path, _ = write_gguf(tmp_path / "m.gguf", save_checkpoint(full, CFG, tmp_path / "ckpt"), gguf.GGMLQuantizationType[kind])
    whole = load_gguf(path, CFG, torch.float32, "cpu")
    assert not torch.equal(whole["0.w13"], full["0.w13"])  # really quantized
    for r in range(2):
        got, want = load_model(str(path), 0, torch.float32, "cpu", shard=(r, 2)).weights, shard_weights(CFG, whole, r, 2)
        for k in want:
            assert torch.equal(got[k], want[k]), (r, k)


# --- the probe's property under tp (gloo) ----------------------------------------------------------------
class _LibraryOverWholeTile(TPLibraryReduce):
    """What TPOps must not do: reduce the tiled backend's whole padded tile. Decode's message is then as
    large as prefill's, and even the library's size-dependent all_reduce looks exact."""

    def linear_reduce(self, x, w, step):
        return self.inner.reduced(self.inner.partial(x, w, step), replace(step, kv_rows=None), library_all_reduce,
                                  x.dtype)


def _decode_and_prefill(tp, kv_aligned: int, perturb: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode logits at DECODE_POS after a CTX prefill, prefill logits at DECODE_POS), teacher-forced."""
    w = synthetic_shard(CFG, 0, torch.bfloat16, "cpu", tp.rank, tp.world) if tp else synthetic(CFG, 0, torch.bfloat16, "cpu")
    prompt = synthetic_prompt(CTX + STEPS, CFG.vocab_size, 3)

    def runner():
        m = Runner(CFG, w, max_tokens=CTX + STEPS, kv_aligned=kv_aligned, chunk=CHUNK, kv_block=KV_BLOCK,
                   perturb="none" if perturb == "whole_tile" else perturb, tp=tp)
        if perturb == "whole_tile":
            m.ops = _LibraryOverWholeTile(m.ops)
        return m

    m = runner()
    m.prefill(prompt[:CTX])
    dec = torch.stack([m.decode(prompt[p], p) for p in DECODE_POS])
    pre = runner().prefill(prompt, keep=DECODE_POS)
    return dec, pre


CASES = {"exact": (1, "none"), "library": (1, "tp_library_reduce"), "kv0": (0, "none"),
         "whole_tile": (1, "whole_tile"), "rope_offset": (1, "rope_offset")}


def _rank_body(cases: list[str]) -> dict:
    tp, _ = init_from_env("cpu", timeout_s=60)
    try:
        torch.set_num_threads(1)
        return {c: _decode_and_prefill(tp, *CASES[c]) for c in cases}
    finally:
        finish()


@pytest.fixture(scope="module")
def tp1():
    torch.manual_seed(0)
    return _decode_and_prefill(None, 1, "none")


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request) -> tuple[int, list[dict]]:
    """(world, every rank's {case: (decode, prefill)}) from one gloo group."""
    world = request.param
    cases = ["exact", "library", "kv0", "whole_tile"] if world == 4 else ["exact", "library", "rope_offset"]
    return world, spawn(_rank_body, world, args=(cases,), timeout_s=240)


def test_tp_decode_equals_prefill_bit_for_bit(ranks):
    world, res = ranks
    for r, got in enumerate(res):
        dec, pre = got["exact"]
        assert torch.equal(dec, pre), (world, r, float((dec - pre).abs().max()))


def test_every_rank_returns_the_same_logits(ranks):
    world, res = ranks
    for case in res[0]:
        for got in res[1:]:
            assert all(torch.equal(a, b) for a, b in zip(got[case], res[0][case])), (world, case)


def test_tp_logits_are_close_to_tp1(ranks, tp1):
    """Sharding changes the order of the wo/w2 sums, nothing else: within bf16 noise of one GPU's logits."""
    world, res = ranks
    dec, pre = res[0]["exact"]
    assert float((pre - tp1[1]).abs().max()) < 0.1, world
    assert float((dec - pre).abs().max()) == 0.0


def test_library_all_reduce_breaks_decode_at_4_ranks(ranks):
    """The negative control: gloo's all_reduce sums a 1-row message in another order than a 64-row one, so
    decode differs from prefill at 4 ranks; at 2 ranks a sum is one addition, exact in any order."""
    world, res = ranks
    dec, pre = res[0]["library"]
    diff = float((dec - pre).abs().max())
    if world == 2:
        assert diff == 0.0
    else:
        assert diff > 0.0, "gloo's all_reduce showed no size dependence: the control cannot fail"


def test_reducing_the_padded_tile_would_hide_the_library_reduce(ranks):
    """Why TPOps reduces only a step's real rows: over the whole padded tile, decode's message is prefill's
    size, so the library reduce that fails above passes here. A probe built that way could not see it."""
    world, res = ranks
    if world != 4:
        pytest.skip("measured at 4 ranks")
    dec, pre = res[0]["whole_tile"]
    assert torch.equal(dec, pre)


def test_rope_offset_control_fails_under_tp(ranks):
    world, res = ranks
    if world != 2:
        pytest.skip("measured at 2 ranks")
    dec, pre = res[0]["rope_offset"]
    assert float((dec - pre).abs().max()) > 0.1


def test_kv0_under_tp_runs_and_drifts_a_little(ranks):
    world, res = ranks
    if world != 4:
        pytest.skip("kv0 is measured at 4 ranks")
    dec, pre = res[0]["kv0"]
    assert torch.isfinite(dec).all() and 0.0 < float((dec - pre).abs().max()) < 1.0


# --- the launcher --------------------------------------------------------------------------------------
def _fail_on_rank_1():
    import os

    if os.environ["RANK"] == "1":
        raise RuntimeError("boom")
    return "ok"


def _hang_on_rank_0():
    import os
    import time

    if os.environ["RANK"] == "0":
        time.sleep(600)
    return "ok"


def _environment():
    import os

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NCCL_NVLS_ENABLE",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "GRETA_TEST_VAR")
    return {k: os.environ.get(k) for k in keys}


def _killed_in_a_collective():
    import os
    import signal

    import torch.distributed as dist

    tp, _ = init_from_env("cpu", timeout_s=60)
    if tp.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # dies while rank 0 waits for it in the all_reduce
    dist.all_reduce(torch.ones(4))
    return "unreachable"


def _hung_in_a_collective():
    import time

    import torch.distributed as dist

    tp, _ = init_from_env("cpu", timeout_s=3)  # the collectives' own timeout
    if tp.rank == 0:
        time.sleep(600)
    dist.all_reduce(torch.ones(4))
    return "unreachable"


def test_a_killed_rank_is_named_and_the_others_stopped():
    with pytest.raises(SpawnError, match=r"rank 1 died \(exit code -9\)") as e:
        spawn(_killed_in_a_collective, 2, timeout_s=60)
    assert e.value.rank == 1


def test_a_hung_peer_ends_in_the_collective_timeout_not_the_spawn_timeout():
    """Rank 0 hangs outside any collective; rank 1's all_reduce gives up after the 3 s set at init, so the
    group fails long before spawn's 120 s (a hang cannot outlive the phase timeout)."""
    t0 = time.monotonic()
    with pytest.raises(SpawnError, match="rank 1 failed") as e:
        spawn(_hung_in_a_collective, 2, timeout_s=120)
    assert e.value.rank == 1 and time.monotonic() - t0 < 60


def test_every_rank_gets_torchruns_environment_with_multicast_off(monkeypatch):
    monkeypatch.setenv("GRETA_TEST_VAR", "parent")
    envs = spawn(_environment, 2, timeout_s=60, env={"GRETA_TEST_VAR": None})
    for r, e in enumerate(envs):
        assert (e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) == (str(r), str(r), "2", "2")
        assert e["MASTER_ADDR"] == "127.0.0.1" and e["MASTER_PORT"] == envs[0]["MASTER_PORT"]
        assert (e["NCCL_NVLS_ENABLE"], e["TORCH_SYMM_MEM_DISABLE_MULTICAST"], e["NVSHMEM_DISABLE_NVLS"]) == ("0", "1", "1")
        assert e["GRETA_TEST_VAR"] is None  # env={...: None} unsets
    import os

    assert "RANK" not in os.environ and os.environ["GRETA_TEST_VAR"] == "parent"  # the parent's is restored


def test_init_from_env_without_torchruns_environment_is_one_line(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set: start the ranks with"):
        init_from_env("cpu")


def test_spawn_names_the_rank_that_failed():
    with pytest.raises(SpawnError, match="rank 1 failed: RuntimeError: boom") as e:
        spawn(_fail_on_rank_1, 2, timeout_s=60)
    assert e.value.rank == 1


def test_spawn_stops_every_rank_on_timeout():
    # rank 1 returns at once; on a loaded machine it may still be starting when the 20 s are up
    with pytest.raises(SpawnError, match=r"rank\(s\) 0(, 1)? still running after 20 s") as e:
        spawn(_hang_on_rank_0, 2, timeout_s=20)
    assert e.value.rank == 0


# --- presets, params, floors ---------------------------------------------------------------------------
def test_70b_presets_and_per_rank_floors():
    from greta.engine.config import PRESETS
    from greta.record.samples import floor_mb

    c, c31 = PRESETS["llama3-70b"], PRESETS["llama3.1-70b"]
    assert c.param_count() == c31.param_count() == 70_553_706_496
    assert c.rope_scaling is None and c31.rope_scaling["factor"] == 8.0
    # per rank at tp=4: the linears and lm_head split, the 1.05 G-parameter embedding replicated
    emb, norms = c.vocab_size * c.hidden_size, (2 * c.n_layers + 1) * c.hidden_size
    linears = c.param_count() - 2 * emb - norms
    assert c.rank_param_count(4) == emb + emb // 4 + norms + linears // 4
    f1, f4 = floor_mb(c, 2, 32768), floor_mb(c, 2, 32768, tp=4)
    assert f4["kv_cache_mb"] == pytest.approx(f1["kv_cache_mb"] / 4, abs=0.1)
    assert 35_000 < f4["weights_mb"] < 35_300 and f4["allreduce_bytes_per_token"] == 2 * 80 * 8192 * 2
    assert c.rank_decode_bytes(32768, 1) == c.decode_bytes(32768)
    assert c.rank_decode_bytes(32768, 4) < c.decode_bytes(32768) / 3.9


def test_tp_param_is_checked_in_one_line():
    from greta.record.params import ParamError, Params

    assert Params(model="llama3-70b", tp=4).tp == 4
    for bad, match in [(dict(tp=5), r"tp=5 is not one of \[1, 2, 3, 4, 8\]"),
                       (dict(model="llama3-8b", tp=3), "tp=3 does not divide model llama3-8b's"),
                       (dict(model="tiny", tp=2), "tp=2 does not divide model tiny's n_kv_heads=1"),
                       (dict(model="llama3-8b", tp=2, perturb="tp_library_reduce"), "needs -p tp=4 or 8")]:
        with pytest.raises(ParamError, match=match) as e:
            Params.from_dict(bad)
        assert "\n" not in str(e.value)
    assert Params.from_dict({"model": "llama3-8b", "tp": "4", "perturb": "tp_library_reduce"}).tp == 4


def test_the_probe_refuses_a_tp_with_fewer_gpus_than_ranks(monkeypatch):
    """The probe runs tp > 1 (tests/test_tp_probe.py), rank r on cuda:r: a host with fewer GPUs is one line."""
    from greta.probe.preflight import preflight
    from greta.record.params import ParamError, Params

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ParamError, match=r"param tp=4 needs 4 GPUs \(rank r on cuda:r\) but 2 are visible"):
        preflight(Params(model="llama3-8b", device="cuda", tp=4))


def test_teacher_forced_reference_equals_a_full_prefill():
    """Runner.teacher_forced (bench_tp's and the GPU test's reference: one full tile re-prefilled from the
    cache) gives a full prefill's logits at the fed positions, bit for bit, in kv_aligned=1."""
    from greta.engine.config import PRESETS

    cfg = PRESETS["tiny"]
    w = synthetic(cfg, 0, torch.bfloat16, "cpu")
    prompt = synthetic_prompt(40, cfg.vocab_size, 4)

    def runner():
        return Runner(cfg, w, max_tokens=48, kv_aligned=1, chunk=16, kv_block=32)

    m = runner()
    fed = [m.prefill(prompt)[0].argmax()]
    for j in range(2):
        fed.append(m.decode(fed[-1], 40 + j).argmax())
    ref = m.teacher_forced(prompt, fed)
    full = runner().prefill(torch.cat([prompt, torch.stack(fed)]), keep=[40, 41, 42])
    assert torch.equal(ref, full)
    with pytest.raises(ValueError, match="inside the tile"):
        m.teacher_forced(prompt[:31], fed)  # positions 31..33 cross the tile boundary at 32


# --- the Triton backend under tp (the interpreter, fp32: its bf16 tl.dot is wrong) -------------------------
def _triton_rank_body(perturb: str) -> dict:
    tp, _ = init_from_env("cpu", timeout_s=120)
    try:
        torch.set_num_threads(1)
        w = synthetic_shard(CFG, 0, torch.float32, "cpu", tp.rank, tp.world)
        prompt = synthetic_prompt(CTX, CFG.vocab_size, 3)

        def runner():
            return Runner(CFG, w, max_tokens=CTX + 2, kv_aligned=1, chunk=CHUNK, kv_block=64,
                          backend="triton", perturb=perturb, tp=tp)

        m = runner()
        fed = [m.prefill(prompt)[0].argmax()]
        dec = []
        for j in range(2):
            dec.append(m.decode(fed[-1], CTX + j))
            fed.append(dec[-1].argmax())
        return {"decode": torch.stack(dec), "reference": m.teacher_forced(prompt, fed[:2])}
    finally:
        finish()


@pytest.mark.slow
def test_triton_backend_under_tp4_decode_equals_prefill_and_the_control_fails():
    """TritonOps (no padding: a decode step is one row, kv_rows None) wrapped in TPOps, at 4 ranks: exact with
    the rank-order reduction, not with gloo's all_reduce (fp32 too is size-dependent there)."""
    pytest.importorskip("triton")
    interpret = {"TRITON_INTERPRET": "1"}  # in each rank before greta.kernels is first imported
    exact = spawn(_triton_rank_body, 4, args=("none",), timeout_s=600, env=interpret)
    assert all(torch.equal(r["decode"], r["reference"]) for r in exact)
    library = spawn(_triton_rank_body, 4, args=("tp_library_reduce",), timeout_s=600, env=interpret)
    assert not torch.equal(library[0]["decode"], library[0]["reference"])


def test_a_tied_lm_head_is_a_vocab_slice_of_the_replicated_embedding():
    cfg = replace(CFG, tie_embeddings=True)
    full = synthetic(cfg, 1, torch.bfloat16, "cpu")
    for r in range(2):
        s = synthetic_shard(cfg, 1, torch.bfloat16, "cpu", r, 2)
        assert torch.equal(s["embed"], full["embed"])
        assert torch.equal(s["lm_head"], full["embed"][r * 1024:(r + 1) * 1024])
