#!/usr/bin/env bash
# This session's GPU work (issues 11 and 10), in stages that each fit one device call:
#   invariant  the 32k kv_aligned=1 probe must write logits.npz with the v0.6/v0.7 sha256 (the refactor changes no numerics)
#   bench      bench/bench_b3_77.py at 32k: this tree and v0.7 (a copy in .v07, carried), alternated new/old/new
#   audits     the 32k records re-made: kv1 through papermill (the card's own workflow), kv0 and the rope_offset
#              control through greta audit; each verified, sent back without logits
# On the device, from the repo root: source scripts/device_setup.sh && bash scripts/gpu_session.sh STAGE...
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
WANT=19f13d9130516faa446fbbe32904be406948d70689099082ce8b9a80762a4d6a

invariant() {
    python3 -m greta probe -f params/b3_77.yaml -o /tmp/inv --quiet 2>&1 | tail -2
    local f; f=$(ls /tmp/inv/*/b3_77/*/logits.npz | tail -1)
    local got; got=$(sha256sum "$f" | cut -d' ' -f1)
    echo "logits.npz sha256 $got (want $WANT): $([ "$got" = "$WANT" ] && echo SAME || echo DIFFERENT)" | tee "$OUT/invariant.txt"
}

bench() {
    for who in new old new; do
        if [ $who = new ]; then python3 bench/bench_b3_77.py --ctx 32768 --peers --out "$OUT/bench-new" 2>&1 | tail -4
        else (cd .v07 && PYTHONPATH=$PWD python3 bench/bench_b3_77.py --ctx 32768 --no-hf --out "$OUT/bench-v07" 2>&1 | tail -4); fi
    done
}

audits() {
    python3 -m papermill notebooks/run_b3_77.ipynb /tmp/pm-out.ipynb -p params_file params/b3_77.yaml 2>&1 | tail -3
    python3 -m greta audit -f params/b3_77.yaml -p kv_aligned=0 --quiet 2>&1 | tail -2
    python3 -m greta audit -f params/b3_77.yaml -p perturb=rope_offset --quiet 2>&1 | tail -2
    local dirs; dirs=$(find outputs -newer scripts/gpu_session.sh -name manifest.json -path '*/b3_77/*' -printf '%h\n')
    python3 -m greta verify $dirs
    tar czf "$OUT/audits.tgz" --exclude=logits.npz $dirs
}

for stage in "$@"; do
    echo "=== $stage $(date -u +%FT%TZ)"
    "$stage"
done
