"""The batched decode attention kernel (kernels/batch_attention.py) under the Triton interpreter (CPU, fp32 and
fp16): each row bit-identical to the single-sequence decode_attention over its own slab, whatever the other
rows (positions on block and split edges, repeated and permuted sequences, a batch of one), and close to the
torch reference. A row that read another sequence's slab, or past its position, would show: slabs differ
per sequence and are NaN past each row's position."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from greta.kernels import attention  # noqa: E402
from greta.kernels.attention import decode_attention  # noqa: E402
from greta.kernels.batch_attention import batch_decode_attention  # noqa: E402
from greta.kernels.reference import attention_ref  # noqa: E402

if not isinstance(attention._attn_kernel, InterpretedFunction):
    pytest.skip("greta.kernels was imported before TRITON_INTERPRET=1", allow_module_level=True)

SMALL = dict(block_m=16, block_kv=16, split_kv=32)


def slabs(n_seqs, s_max, n_kv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_seqs, n_kv, s_max, D, generator=g).to(dtype)
    v = torch.randn(n_seqs, n_kv, s_max, D, generator=g).to(dtype)
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D,n_heads,n_kv", [(64, 4, 1), (64, 8, 2)])
def test_each_row_is_its_single_sequence_decode(D, n_heads, n_kv, dtype):
    s_max = 96
    k, v = slabs(4, s_max, n_kv, D, dtype, seed=D + n_heads)
    seq = torch.tensor([2, 0, 3, 1, 0])  # sequence 0 twice (two rows of one sequence), not in order
    pos = torch.tensor([0, 15, 31, 32, 70])  # block and split edges
    k_cut, v_cut = k.clone(), v.clone()
    for b, p in zip(seq.tolist(), pos.tolist()):
        if b != 0:
            k_cut[b, :, p + 1:] = float("nan")
            v_cut[b, :, p + 1:] = float("nan")
    k_cut[0, :, 71:] = float("nan")
    v_cut[0, :, 71:] = float("nan")
    q = torch.randn(len(seq), n_heads, D, generator=torch.Generator().manual_seed(3)).to(dtype)
    o = batch_decode_attention(q, k_cut, v_cut, seq, pos, **SMALL)
    for i, (b, p) in enumerate(zip(seq.tolist(), pos.tolist())):
        kb, vb = k_cut[b].clone(), v_cut[b].clone()
        kb[:, p + 1:] = float("nan")
        vb[:, p + 1:] = float("nan")
        one = decode_attention(q[i:i + 1], kb, vb, p, **SMALL)
        assert torch.equal(o[i], one[0]), f"row {i} (sequence {b}, position {p}) differs from decode alone"
        ref = attention_ref(torch.zeros(p + 1, n_heads, D, dtype=dtype).index_copy(0, torch.tensor([p]), q[i:i + 1]),
                            k[b], v[b], 0)[p]
        torch.testing.assert_close(o[i].float(), ref.float(), rtol=2e-3, atol=2e-3)


def test_default_tiles_and_a_batch_of_one():
    k, v = slabs(2, 1024, 1, 64, torch.float32, seed=9)
    q = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(4))
    for b, p in [(0, 0), (1, 63), (1, 64), (0, 1000)]:
        o = batch_decode_attention(q, k, v, torch.tensor([b]), torch.tensor([p]))
        assert torch.equal(o[0], decode_attention(q, k[b], v[b], p)[0])


def test_a_wrong_slab_would_show():
    """Negative check: the same query over another sequence's slab gives other bits (the test can fail)."""
    k, v = slabs(2, 64, 1, 64, torch.float32, seed=11)
    q = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(5))
    o = batch_decode_attention(q, k, v, torch.tensor([1]), torch.tensor([40]), **SMALL)
    assert not torch.equal(o[0], decode_attention(q, k[0], v[0], 40, **SMALL)[0])
