#!/usr/bin/env bash
# The batch probe's GPU work (issue 14), in stages that each fit one device call (10 minutes):
#   tests     the batched decode kernel == decode_attention per row (bf16, 8B head shapes) and the engine's graphed
#             Triton batch == alone == reference; kv0's batched flash-decoding vs its reference and the graphed
#             kv0 batch == eager, near the reference (tests/test_batch_gpu.py), plus the existing GPU kernel tests
#   bench4k   bench/bench_batch.py: B 1..32 at 4k, kv1 (Triton, graphed) and kv0 (batched flash-decoding, graphed):
#             tokens/s vs floor, exactness
#   bench32k  the same at 32k (B up to what fits: 8 on an 80 GB card)
#   sweep4k_a / sweep4k_b / sweep32k   the batch sweeps (params/batch_4k.yaml split in two calls by B, then resumed;
#             params/batch_32k.yaml), each point a sealed record; the report with throughput and |Δ| vs B
#   control   the batch-dependent control (perturb=batch_split_k) at B=8, 4k (params/batch.yaml): must be FAIL_BATCH_INVARIANT
# On the device, from the repo root: source scripts/device_setup.sh && bash scripts/gpu_batch.sh STAGE...
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"

tests() {
    python3 -m pytest -q -x tests/test_batch_gpu.py tests/test_kernels_gpu.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
}

bench4k() {
    python3 bench/bench_batch.py --batch 1 2 4 8 16 32 --ctx 4096 --kv 1 0 --gen 32 --check 4 --out "$OUT/bench" 2>&1 | tail -22
}

bench32k() {
    python3 bench/bench_batch.py --batch 1 2 4 8 --ctx 32768 --kv 1 0 --gen 16 --check 2 --out "$OUT/bench" 2>&1 | tail -14
}

sweep4k_a() {
    python3 -m greta sweep -f params/batch_4k.yaml -p 'batch=[1,2,4,8,16,32]' --quiet 2>&1 | tail -3
}

sweep4k_b() {  # resume whatever the first call did not finish
    local d; d=$(ls -d outputs/*/batch-sweep/*batch_4k* | tail -1)
    python3 -m greta sweep --resume "$d" --quiet 2>&1 | tail -3
    tar czf "$OUT/sweep4k.tgz" --exclude=batch_logits.npz "$d"
}

sweep32k() {
    python3 -m greta sweep -f params/batch_32k.yaml --quiet 2>&1 | tail -3
    local d; d=$(ls -d outputs/*/batch-sweep/*batch_32k* | tail -1)
    tar czf "$OUT/sweep32k.tgz" --exclude=batch_logits.npz "$d"
}

control() {
    python3 -m greta audit -f params/batch.yaml -p perturb=batch_split_k --quiet 2>&1 | tail -2
    local d; d=$(find outputs -newer scripts/gpu_batch.sh -name manifest.json -path '*/batch/*' -printf '%h\n' | tail -1)
    python3 -m greta verify "$d" && tar czf "$OUT/control.tgz" --exclude=batch_logits.npz "$d"
}

for stage in "$@"; do
    echo "=== $stage $(date -u +%FT%TZ)"
    "$stage"
done
