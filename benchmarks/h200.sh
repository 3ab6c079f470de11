#!/usr/bin/env bash
# The GPU benchmark run behind docs/benchmarks.md, as one command on a machine with one NVIDIA GPU and no network:
#   bash benchmarks/h200.sh OUT_DIR [throughput.py flags...]
# It counts what backward keeps (activation_memory.py, on the card), then times the steps (throughput.py).
# Run it from the repository root: glip_hf is imported from there (the GPU machine does not have it installed).
# Wheels the machine lacks (this project's pinned transformers, open_clip_torch and its ftfy/wcwidth) may be carried
# in .whl/ (how to fetch them: docs/benchmarks.md, "Owed on the GPU"); they are installed into a scratch directory
# first. Before anything runs on the card, it stops with one line if glip_hf does not import, or if open_clip does
# not and no --impls was given (a run without open_clip has no "vs open_clip" column).
# Environment: H200_JSON=FILE writes throughput.py's JSON there instead of OUT_DIR/throughput.json (it is rewritten
# after every row: point it into the folder whose files come back, so that a call cut short keeps its rows);
# H200_SKIP_ACTIVATION=1 skips the activation count (the same on every call of one machine); H200_SITE: where the
# wheels are installed (default /tmp/site; a later call on the same machine reuses them).
set -uo pipefail
out=${1:?usage: bash benchmarks/h200.sh OUT_DIR [flags]}
shift
if [ ! -f glip_hf/__init__.py ]; then
    echo "h200.sh: run it from the repository root (no glip_hf/ in $PWD)" >&2
    exit 2
fi
mkdir -p "$out"
site=${H200_SITE:-/tmp/site}
if [ -f "$site/.installed" ]; then  # an earlier call on this machine installed them
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif compgen -G ".whl/*.whl" > /dev/null; then
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl; then
        echo "h200.sh: the wheels in .whl/ did not install (pip's message above); fix the folder or remove it" >&2
        exit 1
    fi
    touch "$site/.installed"
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! python3 -c "import glip_hf" 2> "$out/preflight.log"; then
    tail -n 1 "$out/preflight.log" >&2
    echo "h200.sh: glip_hf does not import here (above); carry the wheels in .whl/ (docs/benchmarks.md)" >&2
    exit 1
fi
if ! python3 -c "import open_clip" 2>> "$out/preflight.log" && [[ " $* " != *" --impls"* ]]; then
    echo "h200.sh: open_clip does not import here ($out/preflight.log); carry its wheels in .whl/, or pass" \
        "--impls glip to time GLIP alone" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
# What backward keeps, counted on the card (seconds; the CPU count is in docs/benchmarks.md): first, as it is cheap.
if [ "${H200_SKIP_ACTIVATION:-0}" != 1 ]; then
    python3 benchmarks/activation_memory.py --device cuda --out "$out/activation_memory.json" 2>&1 \
        | tee "$out/activation_memory.log"
fi
python3 benchmarks/throughput.py --out "${H200_JSON:-$out/throughput.json}" "$@" 2>&1 | tee "$out/throughput.log"
