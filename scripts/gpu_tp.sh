#!/usr/bin/env bash
# The probe under tensor parallelism on one 4-GPU host (issue 12), in stages that each fit one device call
# (10 minutes). Every rank is a worker process on cuda:<rank>, NVLink multicast off in each (greta/probe/ranks.py).
#   tests      the engine's GPU tp tests (reductions, tp=4 exactness) and the probe's CPU tp tests
#   tp4        llama3-70b, ctx 32768, tp=4, kv1, Triton (params/llama3_70b_tp4.yaml): PASS_EQUIV, bit_exact true
#   control    the same with perturb=tp_library_reduce at ctx 32753 (the compared rows inside one full 2048-row
#              reference chunk): NCCL's own all_reduce, size-dependent at 4 ranks: FAIL_EQUIV
#   rope       the same with perturb=rope_offset: FAIL_EQUIV
#   kv0        the same with kv_aligned=0 (cuBLAS/SDPA, NCCL all_reduce): EXPECTED_DRIFT
#   tp8b       llama3-8b at 32k, tp=2 and tp=4, kv1 (params/b3_77.yaml): PASS_EQUIV bit-exact
#   faults     llama3-8b at 4k, tp=2, NCCL: a killed rank (FAIL_ERROR "rank 1 died with signal 9"), a hung rank
#              (FAIL_TIMEOUT naming rank 1; on NCCL the watchdog may instead abort rank 0 when its collective
#              times out: then FAIL_ERROR "rank 0 died with signal 6" -- the stage shows which), an OOM on rank 1
#              (FAIL_OOM "rank 1: ..."); none may leave a process behind
# On the device, from the repo root: source scripts/device_setup.sh && bash scripts/gpu_tp.sh STAGE...
# Records go to /tmp/rec-tp and come back verified as $OUT/records-STAGE.tgz (logits left out); each stage
# also lists the processes left behind (there must be none).
set -u
OUT=${OUT:-/tmp/gpu-out}
R=/tmp/rec-tp
mkdir -p "$OUT" "$R"
run() { echo "+ $*"; "$@" 2>&1 | grep -v -e IPKernelApp -e Warning | tail -12; }
P70=params/llama3_70b_tp4.yaml

tests() {
    run python3 -m pytest -q -x tests/test_tp_gpu.py
    run python3 -m pytest -q -x tests/test_tp_probe.py
}

tp4() { run python3 -m greta audit -f $P70 -o $R --quiet; }
control() { run python3 -m greta audit -f $P70 -p perturb=tp_library_reduce -p ctx=32753 -o $R --quiet; }
rope() { run python3 -m greta audit -f $P70 -p perturb=rope_offset -o $R --quiet; }
kv0() { run python3 -m greta audit -f $P70 -p kv_aligned=0 -o $R --quiet; }

tp8b() {
    run python3 -m greta audit -f params/b3_77.yaml -p tp=2 -o $R --quiet
    run python3 -m greta audit -f params/b3_77.yaml -p tp=4 -o $R --quiet
}

faults() {
    local F="-f params/b3_77.yaml -p tp=2 -p ctx=4096 -o $R --quiet"
    run python3 -m greta probe $F -p fault=kill:decode@1
    run python3 -m greta probe $F -p fault=hang:decode@1 -p timeouts.decode=25
    run python3 -m greta probe $F -p fault=oom:prefill@1
}

summary() {  # verdict, bit_exact, every rank's peak against the per-rank floor, for each record of this stage
    python3 - "$@" <<'PY'
import json, sys, pathlib
for d in map(pathlib.Path, sys.argv[1:]):
    v, vs = json.loads((d / "verdict.json").read_text()), json.loads((d / "vram.json").read_text())
    ranks = " ".join(f"r{x['rank']}:{x['peak_vram_mb']}" for x in vs.get("ranks", []))
    print(d.name, v["verdict"], "bit_exact", v["bit_exact"], "| floor/rank", vs["floor"]["total_mb"], "MB | peaks", ranks)
    print("   ", v["reason"][:200])
PY
}

for stage in "$@"; do
    echo "=== $stage $(date -u +%FT%TZ)"
    touch "$OUT/.start-$stage"
    "$stage"
    dirs=$(find $R -name manifest.json -path '*/b3_77/*' -newer "$OUT/.start-$stage" -printf '%h\n')
    if [ -n "$dirs" ]; then
        run python3 -m greta verify $dirs
        summary $dirs | tee "$OUT/summary-$stage.txt"
        tar czf "$OUT/records-$stage.tgz" --exclude=logits.npz $dirs
    fi
    echo "left behind:"; pgrep -af 'spawn_main|greta' | grep -v pgrep || echo "  none"
done
