#!/usr/bin/env bash
# The benchmark tables of BENCHMARKS.md on a GPU: the same rounds, per-round ratios and verdicts as `make bench`,
# timed between torch.cuda.synchronize() calls, peak memory from torch.cuda.max_memory_allocated.
#
# Budget: under 10 minutes on one GPU. Each table stops at 30 rounds or after 1 minute of rounds, whichever is
# first (a GPU step takes milliseconds, so the interval is usually within +-0.05 long before); the CPU-only
# sections (QLoRMA memory, torch.compile graph breaks) are skipped. Needs a CUDA build of torch in the venv
# (PY=/path/to/python to use another interpreter). Writes BENCHMARKS-gpu.md (OUT_MD=... to change it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    make install
fi
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_bench.sh: torch sees no CUDA device")'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 590 "$PY" -m benchmarks.run --device cuda --table-minutes 1 --max-rounds 30 --skip compile quant \
    --out "${OUT_MD:-BENCHMARKS-gpu.md}" "$@"
