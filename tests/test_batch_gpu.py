"""The batch path compiled on a GPU (bf16): the batched decode attention kernel against the single-sequence
decode at Llama-3-8B head shapes, and the engine's batch (Triton, CUDA-graphed decode) bit-identical to alone
and to the reference; kv_aligned=0: batched flash-decoding against its reference (eager and graphed), and the
engine's kv0 batch (FastBatchOps, CUDA-graphed) the same as its eager step and near the reference. Skipped on
the CPU and in a process that runs Triton interpreted."""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA/ROCm device", allow_module_level=True)
pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("this process runs Triton interpreted", allow_module_level=True)


def test_batch_decode_attention_is_decode_attention_per_row():
    from greta.kernels.attention import decode_attention
    from greta.kernels.batch_attention import batch_decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    n_seqs, n_kv, s_max, D, n_heads = 6, 8, 8192, 128, 32
    k = torch.randn(n_seqs, n_kv, s_max, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(n_seqs, n_kv, s_max, D, device="cuda", generator=g).bfloat16()
    seq = torch.tensor([5, 0, 3, 1, 2, 4], device="cuda")
    pos = torch.tensor([0, 1023, 1024, 4095, 5000, 8191], device="cuda")
    q = torch.randn(6, n_heads, D, device="cuda", generator=g).bfloat16()
    o = batch_decode_attention(q, k, v, seq, pos)
    for i in range(6):
        b, p = int(seq[i]), int(pos[i])
        assert torch.equal(o[i], decode_attention(q[i:i + 1], k[b], v[b], p)[0]), i


def test_engine_batch_is_alone_is_reference_on_the_gpu():
    from greta.engine.config import PRESETS
    from greta.engine.weights import synthetic
    from test_batch import three_ways  # tests/ is on sys.path (rootdir-relative test modules)

    cfg = PRESETS["tiny"]
    w = synthetic(cfg, 0, torch.bfloat16, "cuda")
    res, _ = three_ways(cfg, w, [700, 1500, 1100, 64], [5, 9, 3, 9], backend="triton", chunk=256, kv_block=1024)
    for b, (a, x, c) in enumerate(res):
        assert torch.equal(a, x) and torch.equal(x, c), b


# ----------------------------------------------------------------------------- kv_aligned=0: the fast path
BF16 = dict(rtol=1.6e-2, atol=1.6e-2)  # about two units in the last place (tests/test_kernels_gpu.py)


def test_flash_decode_batch_matches_reference_and_graph():
    """kv0's batched flash-decoding at Llama-3-8B head shapes: each row near the reference over its own slab;
    replayed from a CUDA graph at other sequences and positions, the bits of the eager call; a row pointed at
    another slab is far off (negative control)."""
    from greta.kernels.flash_decode import flash_decode_batch
    from greta.kernels.reference import batch_decode_ref

    g = torch.Generator(device="cuda").manual_seed(1)
    n_seqs, n_kv, s_max, D, n_heads = 6, 8, 8192, 128, 32
    k = torch.randn(n_seqs, n_kv, s_max, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(n_seqs, n_kv, s_max, D, device="cuda", generator=g).bfloat16()
    q = torch.randn(6, n_heads, D, device="cuda", generator=g).bfloat16()
    seq = torch.tensor([5, 0, 3, 1, 2, 4], device="cuda")
    pos = torch.tensor([0, 1023, 1024, 4095, 5000, 8191], device="cuda")
    ref = batch_decode_ref(q, k, v, seq, pos)
    torch.testing.assert_close(flash_decode_batch(q, k, v, seq, pos), ref, **BF16)
    g_seq, g_pos = seq.clone(), pos.clone()
    flash_decode_batch(q, k, v, g_seq, g_pos)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_decode_batch(q, k, v, g_seq, g_pos)
    for s2, p2 in [([0, 1, 2, 3, 4, 5], [8191, 7, 2048, 3000, 1, 6000]), ([1, 1, 4, 0, 5, 2], [300] * 6)]:
        s2, p2 = torch.tensor(s2, device="cuda"), torch.tensor(p2, device="cuda")
        g_seq.copy_(s2)
        g_pos.copy_(p2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, flash_decode_batch(q, k, v, s2, p2))
        torch.testing.assert_close(out, batch_decode_ref(q, k, v, s2, p2), **BF16)
    wrong = flash_decode_batch(q, k, v, seq.roll(1), pos)
    assert (wrong.float() - ref.float()).abs().amax(dim=(1, 2)).min() > 5e-2  # measured on the CPU: 0.098


def _kv0_runner(cfg, w, lengths, gens, perturb="none"):
    """(runner, prompts, each prompt's last prefill logits): a kv0 Runner of several slabs on CUDA (graphable, batch decode
    by FastBatchOps) with the requests' prompts prefilled."""
    from greta.engine.requests import prefill_all
    from greta.engine.runner import Runner
    from greta.engine.prompt import synthetic_prompt

    prompts = [synthetic_prompt(n, cfg.vocab_size, 10 + b).cuda() for b, n in enumerate(lengths)]
    br = Runner(cfg, w, n_seqs=len(lengths), max_tokens=max(lengths) + max(gens), kv_aligned=0, chunk=256,
                     kv_block=1024, perturb=perturb)
    fast = br.batch_ops if perturb == "none" else br.batch_ops.inner
    assert br.graphable and type(fast).__name__ == "FastBatchOps"
    return br, prompts, prefill_all(br, prompts)


def test_engine_kv0_batch_graphed_is_eager_and_near_the_reference():
    """The kv0 batch on CUDA (FastBatchOps: one batched flash-decoding launch per layer) replays its step from
    CUDA graphs, one per row count: the logits match an eager runner fed the same tokens (as
    tests/test_kernels_gpu.py's single-sequence kv0 graph test, atol 1e-3), and each request's are within the
    kv0 bf16 tolerance (0.05, tests/test_kv0_fast.py) of its teacher-forced prefill reference. Negative
    control: kv_off_by_one (graphed too, its moved positions computed in the graph) drifts further from the
    reference than the correct run (on the CPU's torch kv0 path: 0.094 vs 0.020)."""
    from greta.engine.config import PRESETS
    from greta.engine.weights import synthetic

    cfg = PRESETS["tiny"]
    w = synthetic(cfg, 0, torch.bfloat16, "cuda")
    lengths, gens = [700, 1500, 1100, 64], [5, 9, 3, 9]
    drift, (br, tokens, kept) = _greedy_drift(cfg, w, lengths, gens)
    assert br._graphs.captured() == {("batch", 4), ("batch", 3), ("batch", 2)}  # the steps' live rows; no graph per position or KV block
    eager, _, _ = _kv0_runner(cfg, w, lengths, gens)
    eager.graphable = False
    for j in range(max(gens)):  # the eager runner fed the graphed run's tokens
        live = [b for b in range(len(lengths)) if j < gens[b]]
        rows = eager.decode_batch([tokens[b][j] for b in live], [lengths[b] + j for b in live], live)
        for r, b in enumerate(live):
            torch.testing.assert_close(kept[b][j], rows[r], rtol=0, atol=1e-3)
    bad, (bad_br, _, _) = _greedy_drift(cfg, w, lengths, gens, perturb="kv_off_by_one")
    print("kv0 batch drift vs reference:", drift, "kv_off_by_one:", bad)
    assert max(drift) < 0.05 and bad_br._graphs.captured() == {("batch", 4), ("batch", 3), ("batch", 2)}
    assert max(bad) > 2 * max(drift)


def _greedy_drift(cfg, w, lengths, gens, perturb="none"):
    """Greedy batch decode on a kv0 runner; per request max |in-batch logits - its teacher-forced prefill
    reference| over the decode steps, and (runner, tokens, kept logits)."""
    from greta.engine.requests import decode_together, reference

    br, prompts, firsts = _kv0_runner(cfg, w, lengths, gens, perturb)
    tokens, kept = decode_together(br, lengths, firsts, gens, keep=max(gens))
    drift = [float((torch.stack(kept[b]) - reference(br, b, prompts[b], tokens[b], gens[b])[1:]).abs().max())
             for b in range(len(lengths))]
    return drift, (br, tokens, kept)
