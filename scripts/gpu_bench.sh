#!/usr/bin/env bash
# The measurements to take when a GPU is lent, in one call of at most 8 minutes:
#   1. warm network latency per window size (96..224) with ONNX Runtime on CUDA, then with the
#      TensorRT execution provider when installed;
#   2. end-to-end re-contouring p50 of a 512 x 512 x ~150 phantom pair (model kept loaded);
#   3. `jrs batch` throughput in fractions per hour (one worker).
# It writes gpu_bench.json (and nvidia-smi.csv) into $OUT (the device runner's output folder) or
# the current folder. `--dry-run` runs the same code on the CPU with small sizes (tested in
# tests/jrs/test_gpu_bench.py), so the script is known to work before a GPU is spent on it.
#
# usage: scripts/gpu_bench.sh [--dry-run] [more `jrs benchmark gpu` options, e.g. --repeats 5]
# environment:
#   PYTHON      interpreter with jrs installed (default: .venv/bin/python, else python3)
#   OUT         output folder (default: the current folder)
#   JRS_GPU_BENCH_TIMEOUT  hard limit in seconds (default 470, under the 8-minute lease)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
outdir=${OUT:-$PWD}
mkdir -p "$outdir"
limit=${JRS_GPU_BENCH_TIMEOUT:-470}

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$outdir/nvidia-smi.csv" || true
fi
cd "$root"
exec timeout --kill-after=10 "$limit" "$python" -m jrs.cli benchmark gpu \
  --out "$outdir/gpu_bench.json" "$@"
