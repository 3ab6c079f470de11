#!/usr/bin/env bash
# The whole owed GPU run of docs/benchmarks.md in one call of a lent machine, stages in order of what matters most,
# each under the deadline of the call:
#   bash benchmarks/h200_run.sh OUT_DIR [SECONDS]      (SECONDS: the call's limit less a margin; default 560)
# 1. diag: the batch-256 deficit, eager, 75% and 91.8%, with a torch.profiler table per row, after the activation
#    count on the card (at most 150 s);
# 2. main: batch 1024 at 75% (the MFU target's row), GLIP and open_clip, eager and compiled;
# 3. lean: GLIP with --lean_activations at that row, eager and compiled (the memory lever);
# 4. grid: the compiled pairs at 91.8%, 50% and 0% (the 1.3x target is at every ratio), as time allows;
# 5. maxbatch: the largest batch that fits at 75%, eager, each implementation, as time allows.
# Each stage's JSON is written into OUT_DIR after every row (diag.json, main.json, lean.json, grid.json,
# maxbatch.json), so a call cut short keeps every row it measured; the folders of diag, main and grid (logs,
# profiles, the activation count, gpu.txt) are packed into OUT_DIR/<stage>.tgz when the stage ends: eight files,
# the most that come back from a call. The progress lines go to stdout.
# H200_EXTRA: flags appended to every throughput.py call (the CPU test runs the script with tiny sizes this way).
set -uo pipefail
out=${1:?usage: bash benchmarks/h200_run.sh OUT_DIR [SECONDS]}
budget=${2:-560}
work=${H200_WORK:-/tmp/bench}
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd)
read -r -a extra <<< "${H200_EXTRA:-}"
left() { echo $((budget - SECONDS)); }

stage() {  # stage NAME MIN_SECONDS CAP_SECONDS [h200.sh flags...]: run it if MIN_SECONDS remain, within CAP
    local name=$1 need=$2 cap=$3
    shift 3
    local limit
    limit=$(left)
    if [ "$limit" -lt "$need" ]; then
        echo "$(date -u +%T) $name: skipped, $limit s left (needs $need)"
        return
    fi
    [ "$limit" -gt "$cap" ] && limit=$cap
    echo "$(date -u +%T) $name: up to $limit s"
    H200_JSON="$out/$name.json" timeout -k 10 "$limit" bash benchmarks/h200.sh "$work/$name" "$@" "${extra[@]}" \
        --profile "$work/$name/profiles"
    echo "$(date -u +%T) $name: exit $? ($(left) s left)"
    case $name in diag | main | grid) tar czf "$out/$name.tgz" -C "$work" "$name" ;; esac
    export H200_SKIP_ACTIVATION=1  # counted once, in the first stage that ran
}

stage diag 60 150 --modes eager --batches 256 --ratios 0.75,0.918 --steps 8 --warmup 3
stage main 120 100000 --modes eager,compile --batches 1024 --ratios 0.75 --steps 6 --warmup 2
stage lean 80 100000 --skip_grid --batches 1024 --levers lean_activations --lever_ratio 0.75 \
    --lever_modes eager,compile --steps 6 --warmup 2
stage grid 100 100000 --modes compile --batches 1024 --ratios 0.918,0.5,0.0 --steps 6 --warmup 2
stage maxbatch 45 100000 --skip_grid --batches 1024 --ratios 0.75 --steps 3 --max_batch --max_batch_limit 8192 \
    --max_batch_step 512
echo "$(date -u +%T) done ($(left) s of $budget left)"
