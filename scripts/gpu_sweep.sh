#!/usr/bin/env bash
# Parallel sweeps (greta sweep --gpus N, greta/sweeps/parallel.py) on one 4-GPU host (issue 12, part 5), in
# stages that each fit one device call (10 minutes):
#   tp1        llama3-8b, ctx {4096, 8192, 16384} x kv {0, 1} (params/b3_76.yaml, gen 32, span 8), --gpus 4:
#              4 points at a time, one GPU each; PASS_GUARDRAIL; each point's peak near its own floor (its own GPU)
#   tp2        the same matrix at ctx {4096, 8192} with tp=2, --gpus 4: 2 points at a time on GPUs 0,1 and 2,3;
#              every rank's peak against the per-rank floor
#   interrupt  the tp2 sweep, SIGTERM after 45 s: exit 130, the running points INTERRUPTED (complete), none
#              left running; then --resume with --gpus 4: PASS_GUARDRAIL
# On the device, from the repo root: source scripts/device_setup.sh && bash scripts/gpu_sweep.sh STAGE...
# Sweeps go to /tmp/rec-sweep; each stage prints the log's groups (which points overlapped, on which GPUs),
# every point's verdict and peaks, nvidia-smi's per-GPU memory sampled during the stage, and what is left behind.
set -u
OUT=${OUT:-/tmp/gpu-out}
R=/tmp/rec-sweep
mkdir -p "$OUT" "$R"
M="-f params/b3_76.yaml -p gen=32 -p span=8"

tp1() { python3 -m greta sweep $M --gpus 4 -o $R/tp1 2>&1 | tail -20; }
tp2() { python3 -m greta sweep $M -p tp=2 -p "ctx=[4096,8192]" --gpus 4 -o $R/tp2 2>&1 | tail -14; }

interrupt() {
    python3 -m greta sweep $M -p tp=2 -p "ctx=[4096,8192]" --gpus 4 -o $R/interrupt > $OUT/interrupt.log 2>&1 &
    local pid=$!
    sleep 45
    kill -TERM $pid
    wait $pid
    echo "exit code $? (130 expected)"
    cat $OUT/interrupt.log
    local d; d=$(ls -td $R/interrupt/*/b3_77-sweep/* | head -1)
    for p in $d/points/*; do echo "$(basename $p): $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["verdict"])' $p/verdict.json)"; done
    python3 -m greta verify $d/points/*
    echo "left behind after the interrupt:"; pgrep -af 'spawn_main|greta' | grep -v pgrep || echo "  none"
    python3 -m greta sweep --resume $d --gpus 4 2>&1 | tail -14
}

summary() {  # the log's groups and overlaps, each point's verdict and peaks against its floor
    python3 - "$@" <<'PY'
import json, sys, pathlib
from datetime import datetime
for root in map(pathlib.Path, sys.argv[1:]):
    for d in sorted(root.glob("*/b3_77-sweep/*")):
        log = [json.loads(x) for x in (d / "sweep_log.jsonl").read_text().splitlines()]
        print(d, json.loads((d / "sweep_verdict.json").read_text())["verdict"])
        spans = {}
        for e in log:
            if e["action"] == "ran":
                spans[e["point"]] = (e["started_utc"], e["t_utc"], e["gpus"])
        for n, (a, b, g) in spans.items():
            others = [m for m, (c, f, _) in spans.items() if m != n and max(a, c) < min(b, f)]
            p = d / "points" / n
            v, vs = json.loads((p / "verdict.json").read_text()), json.loads((p / "vram.json").read_text())
            mb = lambda x: "-" if x is None else f"{x:.0f}"
            ranks = " ".join(f"r{x['rank']}:{mb(x['peak_vram_mb'])}" for x in vs.get("ranks", [])) or mb(vs["peak_vram_mb"])
            print(f"  {n} GPU {','.join(g)} {a[11:19]}-{b[11:19]} {v['verdict']} bit_exact={v['bit_exact']} "
                  f"floor/rank {mb(vs['floor']['total_mb'])} MB peaks {ranks} | overlapped {len(others)}")
PY
}

for stage in "$@"; do
    echo "=== $stage $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader -l 5 > "$OUT/smi-$stage.csv" 2>/dev/null &
    smi=$!
    # which processes hold memory on which GPU, a minute in: each point's workers on its own group only, and
    # nothing of the sweep's own process (it never touches a GPU)
    (sleep 60; nvidia-smi --query-compute-apps=pid,process_name,used_memory,gpu_bus_id --format=csv > "$OUT/apps-$stage.csv"
     nvidia-smi --query-gpu=index,pci.bus_id --format=csv >> "$OUT/apps-$stage.csv") &
    "$stage"
    cat "$OUT/apps-$stage.csv" 2>/dev/null
    kill $smi 2>/dev/null
    echo "nvidia-smi peak MiB per GPU during $stage:"
    sort -t, -k1,1n -k2,2n "$OUT/smi-$stage.csv" | awk -F', ' '{m[$1]=$2+0>m[$1]?$2+0:m[$1]} END {for (g in m) print "  GPU " g ": " m[g]}'
    summary $R/$stage | tee "$OUT/summary-$stage.txt"
    [ -d $R/$stage ] && tar czf "$OUT/sweep-$stage.tgz" --exclude=logits.npz $R/$stage
    echo "left behind:"; pgrep -af 'spawn_main|greta' | grep -v pgrep || echo "  none"
done
