"""The kernels' torch references: what each kernel computes, in plain torch (no triton needed, so the
torch backends of greta/engine/ops import them on a torch-only install). The kernel tests compare against
them; the torch backends use rmsnorm_ref and rope_ref as their RMSNorm and RoPE (the same bits as the
formulas the engine always used), so each of those exists once."""
import math

import torch


def rmsnorm_ref(x, weight, eps):
    xf = x.float()
    xn = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight.dtype == x.dtype:
        # The product of two bf16 (or fp16, fp32) numbers is exact in fp32, so the multiply in x's dtype
        # rounds once, as the fp32 product below does: the same bits with three fewer kernels.
        return xn * weight
    return (xn.float() * weight.float()).to(x.dtype)


def add_rmsnorm_ref(x, residual, weight, eps):
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rmsnorm_ref(new_residual, weight, eps), new_residual


def rope_ref(x, cos, sin, positions):
    return rope_rows_ref(x, cos[positions].float(), sin[positions].float())


def rope_rows_ref(x, c, s):
    """rope_ref with the tables already taken at the rows' positions: c, s [T, D/2] fp32 (a decoder gathers
    them once per step, not once per layer)."""
    half = x.shape[-1] // 2
    c, s = c[:, None, :], s[:, None, :]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def swiglu_ref(gate, up):
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def matmul_ref(x, w):
    return (x.float() @ w.float().T).to(x.dtype)


def attention_ref(q, k_cache, v_cache, start):
    """Plain torch: fp32 softmax over keys 0..p for each row p = start + t."""
    T, n_heads, D = q.shape
    group = n_heads // k_cache.shape[0]
    n = start + T
    k = k_cache[:, :n].float().repeat_interleave(group, dim=0)   # [n_heads, n, D]
    v = v_cache[:, :n].float().repeat_interleave(group, dim=0)
    s = torch.einsum("thd,hnd->htn", q.float(), k) / math.sqrt(D)
    p = torch.arange(start, n, device=q.device)
    s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > p[:, None], float("-inf"))
    o = torch.einsum("htn,hnd->thd", torch.softmax(s, dim=-1), v)
    return o.to(q.dtype)


def batch_decode_ref(q, k_slabs, v_slabs, seq, pos):
    """A batch decode step: row i of q [n, heads, D] over slab seq[i] of k_slabs, v_slabs [n_seqs, n_kv, S, D],
    keys 0..pos[i], each row by attention_ref (reads the ids back on the host: a reference, not a fast path)."""
    rows = zip(seq.tolist(), pos.tolist())
    return torch.cat([attention_ref(q[i:i + 1], k_slabs[b], v_slabs[b], p) for i, (b, p) in enumerate(rows)])


def sum_in_order_ref(buffers):
    """buffers[0] + buffers[1] + ... in fp32, in that order, rounded once to their dtype (kernels/reduce.py)."""
    total = buffers[0].to(torch.float32, copy=True)  # .float() of fp32 is the same tensor: += would change it
    for b in buffers[1:]:
        total += b.float()
    return total.to(buffers[0].dtype)


def tree_sum_ref(parts, dtype=None):
    """The fixed segment tree of the row-parallel linears (docs/TP.md): parts (a list, left to right) added
    in fp32 as a binary tree, neighbours in pairs, level by level, an odd last node carried up unchanged;
    rounded once to dtype (default: parts[0]'s). A run of 2^k consecutive parts starting at a multiple of
    2^k is one subtree, so tp ranks holding S/tp segments each (S/tp a power of two) compute subtrees, and
    the same function over the ranks' fp32 results completes the same tree."""
    nodes = [p.float() for p in parts]
    while len(nodes) > 1:
        pairs = [nodes[i] + nodes[i + 1] for i in range(0, len(nodes) - 1, 2)]
        nodes = pairs + nodes[len(pairs) * 2:]  # an odd last node goes up as it is
    return nodes[0].to(dtype or parts[0].dtype, copy=True)


def pairwise_dot_ref(x, w):
    """x [M, k] @ w [N, k].T in fp32 the way the Triton interpreter's tl.dot adds (kernels/interpreter.py):
    each product rounded to fp32, then one pairwise tree over k (halves added in place, an odd last term
    carried up)."""
    terms = x.float()[:, None, :] * w.float()[None, :, :]  # [M, N, k]
    while terms.shape[2] > 1:
        half = terms.shape[2] // 2
        paired = terms[:, :, :half] + terms[:, :, half:2 * half]
        terms = torch.cat([paired, terms[:, :, 2 * half:]], dim=2)
    return terms[:, :, 0]


def matmul_tree_ref(x, w, segments, block_k, dtype=None):
    """kernels/gemm_tree.py matmul_tree's arithmetic under the interpreter: K cut into `segments` equal segments;
    each segment's partial an fp32 K loop over block_k blocks (the last one zero-padded, as the kernel's
    masked loads read 0), each block by the interpreter's tl.dot (pairwise_dot_ref); the segments' partials
    added by tree_sum_ref in fp32 and rounded once to dtype (default x's)."""
    M, K = x.shape
    seg = K // segments
    pad = -seg % block_k
    parts = []
    for s in range(segments):
        xs = torch.nn.functional.pad(x[:, s * seg:(s + 1) * seg].float(), (0, pad))
        ws = torch.nn.functional.pad(w[:, s * seg:(s + 1) * seg].float(), (0, pad))
        acc = torch.zeros(M, w.shape[0])
        for k0 in range(0, seg + pad, block_k):
            acc = acc + pairwise_dot_ref(xs[:, k0:k0 + block_k], ws[:, k0:k0 + block_k])
        parts.append(acc)
    return tree_sum_ref(parts, dtype or x.dtype)
