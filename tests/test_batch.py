"""The batched engine (greta/engine/runner.py's batch step, requests.py, ops/batch.py) on the tiny preset, CPU: each request's logits
alone (a), inside the batch (b) and from its teacher-forced prefill (c); kv_aligned=1 makes them bit-identical
at every batch size, with uneven lengths, colliding tile slots and sequences leaving early; the batch-dependent
control (batch_split_k) must break it, and kv_aligned=0's drift is measured."""
from __future__ import annotations

import pytest
import torch

from greta.engine.config import PRESETS, kv_bytes
from greta.engine.kvcache import KVCache
from greta.engine.requests import decode_alone, decode_together, prefill_all, reference
from greta.engine.prompt import synthetic_prompt
from greta.engine.runner import Runner, host_layout

CHUNK, KV_BLOCK = 16, 64


def three_ways(cfg, w, lengths, gens, *, kv_aligned=1, perturb="none", backend="torch", chunk=CHUNK,
               kv_block=KV_BLOCK, install=None):
    """Per request: (a) alone, (b) in the batch, (c) reference, each [gens[b] + 1, V] (row 0: the prefill's
    last position, then every decode step), and the batch's tokens. install(br), if given, swaps the runner's
    ops (a backend the CPU would not pick)."""
    prompts = [synthetic_prompt(n, cfg.vocab_size, 10 + b) for b, n in enumerate(lengths)]
    br = Runner(cfg, w, n_seqs=len(lengths), max_tokens=max(lengths) + max(gens), kv_aligned=kv_aligned,
                     chunk=chunk, kv_block=kv_block, perturb=perturb, backend=backend)
    if install:
        install(br)
    firsts = prefill_all(br, prompts)
    tokens, kept = decode_together(br, lengths, firsts, gens, keep=max(gens))
    out = []
    for b, n in enumerate(lengths):
        a = torch.stack([firsts[b]] + decode_alone(br, b, n, tokens[b], gens[b]))
        in_batch = torch.stack([firsts[b]] + kept[b])
        c = reference(br, b, prompts[b], tokens[b], gens[b])
        out.append((a, in_batch, c))
    return out, tokens


def max_diff(x, y) -> float:
    return float((x.double() - y.double()).abs().max())


# B in {1, 3, 5}; lengths uneven, several on the same slot of the 16-row tile (70, 86, 102: slot 6), and
# gens uneven, so sequences leave the batch while others go on.
CASES = {
    1: ([75], [4]),
    3: ([70, 86, 131], [2, 5, 4]),
    5: ([70, 86, 102, 33, 120], [6, 1, 4, 3, 6]),
}


@pytest.mark.parametrize("n_seqs", sorted(CASES))
def test_kv1_alone_equals_batch_equals_reference(tiny_cfg, tiny_weights, n_seqs):
    lengths, gens = CASES[n_seqs]
    results, tokens = three_ways(tiny_cfg, tiny_weights(), lengths, gens)
    for b, (a, in_batch, c) in enumerate(results):
        assert a.shape == (gens[b] + 1, tiny_cfg.vocab_size) and torch.isfinite(in_batch).all()
        assert torch.equal(a, in_batch), f"request {b}: alone vs batch {max_diff(a, in_batch)}"
        assert torch.equal(in_batch, c), f"request {b}: batch vs reference {max_diff(in_batch, c)}"
        assert tokens[b] == in_batch.argmax(-1).tolist()  # the batch decoded greedily


def test_alone_is_the_single_sequence_runner(tiny_cfg, tiny_weights):
    """(a) is what the B3.77 engine (Runner) gives for the request: the batch path at B=1 changes nothing."""
    lengths, gens = CASES[3]
    w = tiny_weights()
    results, tokens = three_ways(tiny_cfg, w, lengths, gens)
    b = 1
    r = Runner(tiny_cfg, w, max_tokens=max(lengths) + max(gens), kv_aligned=1, chunk=CHUNK, kv_block=KV_BLOCK)
    first = r.prefill(synthetic_prompt(lengths[b], tiny_cfg.vocab_size, 10 + b))[0]
    steps = [r.decode(torch.tensor(tokens[b][j]), lengths[b] + j) for j in range(gens[b])]
    assert torch.equal(torch.stack([first] + steps), results[b][0])


def test_a_sequence_leaving_early_changes_no_other_bits(tiny_cfg, tiny_weights):
    w = tiny_weights()
    long_run, _ = three_ways(tiny_cfg, w, [70, 86, 131], [6, 6, 6])
    short_run, _ = three_ways(tiny_cfg, w, [70, 86, 131], [1, 6, 6])  # request 0 leaves after one step
    for b in (1, 2):
        assert torch.equal(long_run[b][1], short_run[b][1])


def test_colliding_slots_spill_into_another_tile(tiny_cfg, tiny_weights):
    """Three rows wanting slot 6 of the 16-row tile take three tiles, each row at slot 6; one at slot 3
    shares the first tile. Filler rows write no KV."""
    from greta.engine.ops.batch import TiledBatchOps
    from greta.engine.ops.tiled_torch import TiledTorchOps

    ops = TiledBatchOps(TiledTorchOps(None, None, CHUNK, KV_BLOCK))
    pos = torch.tensor([70, 86, 102, 35])
    step = ops.plan_batch(torch.tensor([1, 2, 3, 4]), pos, torch.tensor([0, 1, 2, 3]))
    assert step.tokens.numel() == 3 * CHUNK
    assert step.rows == [6, 16 + 6, 32 + 6, 3]
    assert step.pos[step.rows].tolist() == pos.tolist() and step.seq[step.rows].tolist() == [0, 1, 2, 3]
    assert sorted(step.kv_rows.tolist()) == sorted(step.rows)


def test_the_batch_dependent_control_fails(tiny_cfg, tiny_weights):
    """batch_split_k splits every linear's K while a decode step holds more than one sequence: in-batch logits
    then differ from alone and from the reference, while alone still equals the reference."""
    lengths, gens = CASES[3]
    results, _ = three_ways(tiny_cfg, tiny_weights(), lengths, gens, perturb="batch_split_k")
    for a, in_batch, c in results:
        assert torch.equal(a, c)
        assert max_diff(in_batch[1:2], a[1:2]) > 0  # the first decode step holds all three sequences
    worst = max(max_diff(in_batch, c) for _, in_batch, c in results)
    assert worst > 1e-3


def test_the_control_is_blind_to_a_batch_of_one(tiny_cfg, tiny_weights):
    """The control is batch-dependent only: at B=1 it splits nothing, and all three agree."""
    results, _ = three_ways(tiny_cfg, tiny_weights(), *CASES[1], perturb="batch_split_k")
    a, in_batch, c = results[0]
    assert torch.equal(a, in_batch) and torch.equal(in_batch, c)


def test_kv0_drift_is_measured(tiny_cfg, tiny_weights):
    """kv_aligned=0 decodes with M=rows linears and plain softmax: the batch drifts from the SDPA reference
    (a small, finite, measured figure; nonzero on this CPU); its argmax agrees on the tiny model."""
    lengths, gens = CASES[3]
    results, _ = three_ways(tiny_cfg, tiny_weights(), lengths, gens, kv_aligned=0)
    drift = max(max_diff(in_batch, c) for _, in_batch, c in results)
    assert 0 < drift < 0.1
    for _, in_batch, c in results:
        assert torch.equal(in_batch.argmax(-1), c.argmax(-1))


def test_decode_refuses_a_sequence_twice(tiny_cfg, tiny_weights):
    br = Runner(tiny_cfg, tiny_weights(), n_seqs=2, max_tokens=32, kv_aligned=1, chunk=CHUNK, kv_block=KV_BLOCK)
    with pytest.raises(ValueError, match="at most once"):
        br.decode_batch([1, 2], [3, 4], [0, 0])
    with pytest.raises(IndexError, match="not in a cache of 2"):
        br.cache.sequence(2)
    with pytest.raises(IndexError, match="outside the batch of 2"):
        br.decode_batch([1], [3], [2])


def test_kv_bytes_is_the_cache_size(tiny_cfg):
    cache = KVCache(tiny_cfg, 3, 100, KV_BLOCK, torch.bfloat16, "cpu")
    assert cache.nbytes() == kv_bytes(tiny_cfg, 3, 100, KV_BLOCK, 2)
    cfg = PRESETS["tiny-tp"]  # 4 KV heads: a tp=2 rank holds 2 of them
    rank = KVCache(cfg, 3, 100, KV_BLOCK, torch.bfloat16, "cpu", heads=cfg.n_kv_heads // 2)
    whole = kv_bytes(cfg, 3, 100, KV_BLOCK, 2)
    assert rank.nbytes() == kv_bytes(cfg, 3, 100, KV_BLOCK, 2, heads=cfg.n_kv_heads // 2) == whole // 2
    assert cache.layer(0)[0].shape == (3, tiny_cfg.n_kv_heads, 128, tiny_cfg.head_dim)
    assert cache.sequence(2).layer(1)[0].is_contiguous()


@pytest.mark.slow
def test_triton_batch_of_three_is_exact():
    """The Triton backend under the interpreter (fp32): a batch of three, (a) == (b) == (c) bit for bit."""
    import os
    import subprocess
    import sys

    code = ("import os; os.environ['TRITON_INTERPRET']='1'\n"
            "import torch\nfrom greta.engine.config import PRESETS\nfrom greta.engine.weights import synthetic\n"
            "from tests.test_batch import three_ways\ncfg = PRESETS['tiny']\n"
            "res, _ = three_ways(cfg, synthetic(cfg, 0, torch.float32, 'cpu'), [20, 41, 66], [2, 1, 2], "
            "backend='triton', chunk=64, kv_block=64)\n"
            "assert all(torch.equal(a, b) and torch.equal(b, c) for a, b, c in res), 'not exact'\nprint('exact')\n")
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "exact" in done.stdout, done.stderr[-2000:]


def test_the_host_layout(tiny_cfg, tiny_weights):
    """What an eager step is handed instead of reading it back from the device: each sequence's rows and how
    far the torch kv0 attention reads (the furthest position + 1). No CUDA graph on the CPU; on CUDA one per
    row count (tests/test_batch_gpu.py)."""
    br = Runner(tiny_cfg, tiny_weights(), n_seqs=4, max_tokens=200, kv_aligned=0, chunk=CHUNK, kv_block=KV_BLOCK)
    assert host_layout([63, 10, 5], [1, 2, 3]) == {"seq_groups": [(1, [0]), (2, [1]), (3, [2])], "kv_end": 64}
    assert host_layout([64], [0])["kv_end"] == 65 and not br.graphable
