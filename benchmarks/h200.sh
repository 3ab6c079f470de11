#!/usr/bin/env bash
# The GPU benchmark run behind docs/benchmarks.md, as one command on a machine with one NVIDIA GPU and no network:
#   bash benchmarks/h200.sh OUT_DIR [throughput.py flags...]
# It counts what backward keeps (activation_memory.py, on the card), then times the steps (throughput.py).
# Wheels the machine lacks (this project's pinned transformers, open_clip_torch and its ftfy/wcwidth) may be carried
# in .whl/ (see docs/benchmarks.md); they are installed into a scratch directory first.
set -uo pipefail
out=${1:?usage: bash benchmarks/h200.sh OUT_DIR [flags]}
shift
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
# What backward keeps, counted on the card (seconds; the CPU count is in docs/benchmarks.md): first, as it is cheap.
python3 benchmarks/activation_memory.py --device cuda --out "$out/activation_memory.json" 2>&1 \
    | tee "$out/activation_memory.log"
python3 benchmarks/throughput.py --out "$out/throughput.json" "$@" 2>&1 | tee "$out/throughput.log"
