"""Where a warm kv_aligned=1 prefill spends its GPU time (GPU), Llama-3-8B shape: one prefill under
torch.profiler, kernel time summed by kernel name, largest first, with the share of the total and the wall time.

    python bench/profile_prefill.py [--ctx 32768] [--chunk 2048] [--kv 1]
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from greta.engine.config import PRESETS
from greta.engine.prompt import synthetic_prompt
from greta.engine.runner import Runner
from greta.engine.weights import synthetic


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--kv", type=int, default=1)
    args = ap.parse_args()
    cfg = PRESETS["llama3-8b"]
    dev = torch.device("cuda", 0)
    w = synthetic(cfg, 0, torch.bfloat16, dev)
    prompt = synthetic_prompt(args.ctx, cfg.vocab_size, 0).to(dev)
    m = Runner(cfg, w, max_tokens=args.ctx + 32, kv_aligned=args.kv, chunk=args.chunk, kv_block=1024,
               backend="triton" if args.kv else "torch")
    m.prefill(prompt)  # warm
    m.cache.reset()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        m.prefill(prompt)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    by = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by[e.name][0] += e.device_time_total / 1e3  # ms
            by[e.name][1] += 1
    total = sum(v[0] for v in by.values())
    print(f"{torch.cuda.get_device_name()}: ctx {args.ctx}, chunk {args.chunk}, kv_aligned {args.kv}: "
          f"wall {wall:.3f} s (profiled), kernels {total / 1e3:.3f} s")
    for name, (ms, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"{ms:9.1f} ms {100 * ms / total:5.1f}%  x{n:<5d} {name[:110]}")
    print_gaps(prof)


def print_gaps(prof):
    """The GPU's idle time between consecutive kernels, summed by the kernel that ends the gap: what the
    stream was waiting for the host to launch."""
    ev = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda t: t[0])
    gaps = collections.defaultdict(lambda: [0.0, 0])
    for (_, end, _), (start, _, name) in zip(ev, ev[1:]):
        if start > end:
            gaps[name][0] += (start - end) / 1e3  # us -> ms
            gaps[name][1] += 1
    print(f"GPU idle between kernels: {sum(g[0] for g in gaps.values()):.1f} ms; before:")
    for name, (ms, n) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:8]:
        print(f"{ms:9.1f} ms  x{n:<5d} {name[:110]}")


if __name__ == "__main__":
    main()
