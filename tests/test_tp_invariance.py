"""The same bits at every tensor-parallel degree (docs/TP.md, the tp-invariant mode) on the CPU, gloo.

The proof: greta.engine.tp_invariance runs one prompt at tp = 1, 2 and 4 (each degree its own processes, one
thread each) on the tiny-tp preset and on a config of odd sizes (not a preset: head_dim 12, hidden 72,
intermediate 200, vocab 300, so segments of 6 and 25 columns), in fp32 and bf16: with the segment tree every
prefill and decode logit is bit-identical to tp=1's; with the plain per-rank K order (today's) they differ
(the negative control). Within each degree decode still equals prefill bit for bit, and the controls
(rope_offset; tp_library_reduce at tp=4) still fail. The cheap parts (the algebra of subtrees, the whole-vector
elementwise ops, the comparison's figures, the one-line refusals) are checked in this process."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from greta.engine.config import PRESETS, ModelConfig, check_tree, tree_segments
from greta.engine.ops.tiled_torch import TiledTorchOps, by_whole_vectors
from greta.engine.tp_invariance import DegreeCase, compare_degrees, degree_logits, diff_positions
from greta.kernels.reference import tree_sum_ref

ODD = ModelConfig(name="odd", vocab_size=300, hidden_size=72, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=12,
                  intermediate_size=200, rope_theta=10000.0)
CTX, STEPS, CHUNK, KV_BLOCK = 21, 3, 16, 32  # decode at 21..23: inside the second 16-row tile


def case(cfg, dtype, segments=8, **kw) -> DegreeCase:
    return DegreeCase(cfg, seed=0, dtype=dtype, ctx=CTX, steps=STEPS, chunk=CHUNK, kv_block=KV_BLOCK,
                      tree_segments=segments, **kw)


def reference_of(c: DegreeCase) -> DegreeCase:
    """The same prompt prefilled through the decode positions: its prefill rows c.ctx.. are decode's reference."""
    return replace(c, ctx=c.ctx + c.steps, steps=1, perturb="none")


BASE = [case(cfg, dt, s) for cfg in (PRESETS["tiny-tp"], ODD) for dt in ("float32", "bfloat16") for s in (8, 0)]
REFS = [reference_of(c) for c in BASE if c.tree_segments and c.dtype == "bfloat16"]
# ctx 61 + 3 steps, chunk 64: the reference's rows lie in a full 64-row chunk, so the library control compares
# decode's 1-row reductions with a prefill-sized one (docs/TP.md). In fp32: with the tree the reduction adds
# fp32 partials, and a bf16 model's rounding absorbs the library's last-bit differences nearly always
CONTROLS = [replace(case(PRESETS["tiny-tp"], "float32", perturb=p), ctx=61, chunk=64)
            for p in ("rope_offset", "tp_library_reduce")]
TINY = [case(PRESETS["tiny"], "float32"), reference_of(case(PRESETS["tiny"], "float32"))]


class Logits(dict):
    """{case: (prefill logits, decode logits)}, keyed by the case's repr (a config's rope dict is unhashable)."""

    def __getitem__(self, c: DegreeCase):
        return super().__getitem__(repr(c))


@pytest.fixture(scope="module")
def runs() -> dict:
    """{tp: Logits}: one gloo group per degree, every case in it."""
    out = {}
    for world in (1, 2, 4):
        controls = CONTROLS + [replace(CONTROLS[0], perturb="none"), reference_of(CONTROLS[0])] if world == 4 else []
        cases = BASE + REFS + (TINY if world == 1 else []) + controls
        out[world] = Logits(zip(map(repr, cases), degree_logits(cases, world, timeout_s=400)))
    return out


# --- across degrees --------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [c for c in BASE if c.tree_segments], ids=lambda c: f"{c.cfg.name}-{c.dtype}")
def test_the_tree_gives_tp1s_bits_at_tp2_and_tp4(runs, c):
    result = compare_degrees(c, (1, 2, 4), logits={w: runs[w][c] for w in (1, 2, 4)})
    assert result["bit_identical"], result["degrees"]
    for d in result["degrees"].values():
        assert d["prefill"]["first_diff_pos"] is None and d["decode"]["max_abs_diff"] == 0.0


@pytest.mark.parametrize("c", [c for c in BASE if not c.tree_segments], ids=lambda c: f"{c.cfg.name}-{c.dtype}")
def test_the_plain_per_rank_order_differs_from_tp1(runs, c):
    """The negative control: today's order (each rank's K loop, the partials added by rank) gives other bits
    at tp=2 and tp=4, in both paths; the comparison names where."""
    result = compare_degrees(c, (1, 2, 4), logits={w: runs[w][c] for w in (1, 2, 4)})
    assert not result["bit_identical"]
    for world, d in result["degrees"].items():
        for path in ("prefill", "decode"):
            assert d[path]["max_abs_diff"] > 0.0 and d[path]["first_diff_pos"] is not None, (world, path)
    assert result["degrees"][2]["decode"]["first_diff_pos"] >= CTX


# --- within a degree ---------------------------------------------------------------------------------------
def _decode_vs_prefill(runs, world, c) -> float:
    dec = runs[world][c][1]
    pre = runs[world][reference_of(c)][0][c.ctx:c.ctx + c.steps]
    return float((dec - pre).abs().max())


@pytest.mark.parametrize("world", [1, 2, 4])
def test_decode_equals_prefill_at_every_degree_with_the_tree(runs, world):
    checked = [c for c in BASE if c.tree_segments and c.dtype == "bfloat16"] + (TINY[:1] if world == 1 else [])
    for c in checked:
        dec, pre = runs[world][c][1], runs[world][reference_of(c)][0][c.ctx:c.ctx + c.steps]
        assert torch.equal(dec, pre), (world, c.cfg.name, float((dec - pre).abs().max()))


def test_the_controls_still_fail_with_the_tree(runs):
    rope, library = CONTROLS
    assert _decode_vs_prefill(runs, 4, rope) > 0.1
    assert _decode_vs_prefill(runs, 4, library) > 0.0, "gloo's fp32 all_reduce showed no size dependence here"
    assert _decode_vs_prefill(runs, 4, replace(library, perturb="none")) == 0.0  # the same case, exact


# --- the algebra, in this process ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segments,tp", [(8, 2), (8, 4), (6, 3)])
def test_ranks_subtrees_complete_tp1s_tree_in_tiled_torch(dtype, segments, tp):
    """TiledTorchOps.tree_linear over all of K (rounded once) == the ranks' fp32 subtrees over their column
    shards, added by the tree's top and rounded once; rounding each rank's partial first is not (bf16)."""
    g = torch.Generator().manual_seed(segments * tp)
    K = segments * 25
    x, w = torch.randn(16, K, generator=g).to(dtype), torch.randn(72, K, generator=g).to(dtype)
    ops = TiledTorchOps(torch.zeros(1, 1), torch.zeros(1, 1), 16, 32, whole_vectors=True)
    whole = ops.tree_linear(x, w, segments, dtype)
    n = K // tp
    shards = [(x[:, r * n:(r + 1) * n], w[:, r * n:(r + 1) * n]) for r in range(tp)]
    ranks = [ops.tree_linear(xs, ws, segments // tp, torch.float32) for xs, ws in shards]
    assert torch.equal(tree_sum_ref(ranks, dtype), whole)
    if dtype == torch.bfloat16:  # why the partials cross ranks in fp32
        rounded = [r.to(dtype) for r in ranks]
        assert not torch.equal(tree_sum_ref(rounded, dtype), whole)


def test_the_tree_needs_a_power_of_two_segments_per_rank():
    """S=6 at tp=2: a rank's 3 segments are not one subtree, so the composed sum is another tree (refused
    by check_tree for that reason)."""
    parts = [torch.randn(64, 64, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    halves = [tree_sum_ref(parts[:3]), tree_sum_ref(parts[3:])]
    assert not torch.equal(tree_sum_ref(halves), tree_sum_ref(parts))
    with pytest.raises(ValueError, match="S=6 must be tp=2 times a power of two"):
        check_tree(replace(ODD, intermediate_size=216, head_dim=12, n_heads=6, n_kv_heads=6), 6, 2)


def test_whole_vectors_give_a_shards_elements_the_bits_of_the_whole():
    """silu over a column shard == the whole's columns, bit for bit, by whole vectors; torch's own silu puts
    a shard's last elements in its scalar loop, which differs in the last bit on this data (where it doesn't,
    on this CPU, that half is skipped: it is torch's, not Greta's)."""
    torch.set_num_threads(1)
    x = torch.randn(16, 400, generator=torch.Generator().manual_seed(0)) * 3
    whole = by_whole_vectors(F.silu, x[:, :200])
    for t in (2, 4):
        n = 200 // t
        for r in range(t):
            assert torch.equal(by_whole_vectors(F.silu, x[:, r * n:(r + 1) * n]), whole[:, r * n:(r + 1) * n])
    plain = F.silu(x[:, :200])
    if all(torch.equal(F.silu(x[:, r * 50:(r + 1) * 50]), plain[:, r * 50:(r + 1) * 50]) for r in range(4)):
        pytest.skip("this CPU's scalar and SIMD silu agree on this data: nothing for the control to show")


# --- the comparison and the refusals ----------------------------------------------------------------------------
def test_diff_positions_names_the_first_differing_position():
    ref = torch.zeros(5, 4)
    got = ref.clone()
    assert diff_positions(ref, got, 10) == {"max_abs_diff": 0.0, "first_diff_pos": None, "bit_identical": True}
    got[3, 1], got[4, 0] = 0.5, float("nan")
    d = diff_positions(ref, got, 10)
    assert (d["first_diff_pos"], d["bit_identical"], d["max_abs_diff"]) == (13, False, float("inf"))
    got = ref.clone()
    got[1, 2] = -0.0  # a sign bit is a differing bit
    assert diff_positions(ref, got, 0)["first_diff_pos"] == 1
    with pytest.raises(ValueError, match=r"logits of shape \(4, 4\) cannot be compared with \(5, 4\)"):
        diff_positions(ref, ref[:4], 0)


def test_s_per_model_and_its_refusals():
    assert [tree_segments(PRESETS[m]) for m in ("llama3-8b", "llama3-70b", "tiny", "tiny-tp")] == [8, 8, 8, 8]
    smol = replace(PRESETS["tiny"], n_heads=9, n_kv_heads=3, head_dim=64, hidden_size=576, intermediate_size=1536)
    assert tree_segments(smol) == 24
    check_tree(smol, 24, 3)
    for cfg, s, tp, match in [(ODD, 16, 1, "intermediate_size=200 of model odd must split into S=16"),
                              (PRESETS["llama3-8b"], 8, 3, "S=8 must be tp=3 times a power of two")]:
        with pytest.raises(ValueError, match=match) as e:
            check_tree(cfg, s, tp)
        assert "\n" not in str(e.value)


def test_tp_invariant_param_is_checked_in_one_line():
    from greta.record.params import ParamError, Params

    assert Params(model="tiny-tp", tp=4, tp_invariant=1).tp_invariant == 1
    assert Params().tp_invariant == 0  # today's bits by default
    for bad in (dict(tp_invariant=1, kv_aligned=0), dict(tp_invariant=1, probe="batch"), dict(tp_invariant=2)):
        with pytest.raises(ParamError) as e:
            Params.from_dict(bad)
        assert "\n" not in str(e.value) and "tp_invariant" in str(e.value)


def test_the_runner_refuses_the_tree_without_kv_aligned():
    from greta.engine.runner import Runner
    from greta.engine.weights import synthetic

    w = synthetic(PRESETS["tiny"], 0, torch.float32, "cpu")
    with pytest.raises(ValueError, match="needs kv_aligned=1"):
        Runner(PRESETS["tiny"], w, max_tokens=8, kv_aligned=0, chunk=16, kv_block=32, tree_segments=8)


@pytest.mark.slow
def test_the_triton_backend_gives_tp1s_bits_at_tp2_and_tp4():
    """TritonOps in the tree mode (the interpreter, fp32: its bf16 cast truncates): tp=1's one tree kernel per
    row-parallel linear and tp=2 and 4's subtree kernels + the tree's top give the same bits; the plain order
    does not."""
    pytest.importorskip("triton")
    env = {"TRITON_INTERPRET": "1"}  # in each rank before greta.kernels is first imported
    cases = [replace(case(PRESETS["tiny-tp"], "float32", s), ctx=9, steps=2, kv_block=64, backend="triton")
             for s in (8, 0)]
    logits = {w: degree_logits(cases, w, timeout_s=600, env=env) for w in (1, 2, 4)}
    tree, plain = (compare_degrees(c, (1, 2, 4), logits={w: logits[w][i] for w in (1, 2, 4)})
                   for i, c in enumerate(cases))
    assert tree["bit_identical"], tree["degrees"]
    assert not plain["bit_identical"]


# --- the probe states the mode in its record ----------------------------------------------------------------
def test_a_probe_record_in_the_tree_mode_passes_verifies_and_states_s(tmp_path):
    """-p tp_invariant=1 reaches every rank's Runner: a tp=2 B3.77 record is PASS_EQUIV bit-exact, verifies,
    and says so (params.json tp_invariant, metadata.json tree_segments and the reduction)."""
    import json
    from pathlib import Path

    from greta.checks.verify import verify
    from greta.probe.preflight import preflight
    from greta.probe.runner import run_probe
    from greta.record.params import load_params
    from tests.test_tp_probe import TP_PROBE

    params = preflight(load_params("params/cpu_default.yaml", {**TP_PROBE, "tp": 2, "tp_invariant": 1}))
    d = Path(run_probe(params, out_root=tmp_path, progress=False))
    verdict = json.loads((d / "verdict.json").read_text())
    assert (verdict["verdict"], verdict["bit_exact"]) == ("PASS_EQUIV", True), verdict["reason"]
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["tree_segments"] == 8 and meta["tp"] == {"world": 2, "exact": "tree"}
    assert json.loads((d / "params.json").read_text())["tp_invariant"] == 1
    assert verify(d) == []
