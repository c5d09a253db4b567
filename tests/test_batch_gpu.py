"""The batch path compiled on a GPU (bf16): the batched decode attention kernel against the single-sequence
decode at Llama-3-8B head shapes, and the engine's batch (Triton, CUDA-graphed decode) bit-identical to alone
and to the reference. Skipped on the CPU and in a process that runs Triton interpreted."""
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
