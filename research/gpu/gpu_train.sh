#!/usr/bin/env bash
# One training segment on a lent GPU, in one call of at most 10 minutes
# (research/notes/lent-gpu.md):
#   resume the checkpoint packed by `python -m research.gpu.gpu_pack` (carried as gpu_pack/), train
#   with CUDA AMP (fp16 autocast + GradScaler) on the packed crops for at most 9 minutes of wall
#   time, and write into $OUT: gpu_last.pt (resumable checkpoint, < 16 MiB), gpu_train_log.csv,
#   gpu_summary.json (steps, steps/s, data share, GPU memory, device, torch, loss before/after),
#   gpu_train.log and nvidia-smi.csv.
# It needs only torch, numpy, scipy, pyyaml and tqdm (the GPU image has no SimpleITK, pydicom or
# pydantic, and nothing can be installed there). `--dry-run` runs the same code on the CPU with a
# few steps (tested in tests/training/test_gpu_train.py), so the script is known to work before a
# GPU is spent on it.
#
# usage: research/gpu/gpu_train.sh [--dry-run] [more `python -m research.gpu.gpu_run` options, e.g.
#        --minutes 5 --max-steps 2000 --workers 8 --seed 7]
# environment:
#   PYTHON       interpreter with torch (default: .venv/bin/python, else python3)
#   OUT          output folder (default: gpu_out/ in the repository)
#   JRS_GPU_PACK the pack folder (default: gpu_pack/ in the repository)
#   JRS_GPU_TRAIN_TIMEOUT  hard limit in seconds (default 585: the 9-minute budget, the final
#                save and the start-up, under the 600 s of one call)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-}
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
outdir=${OUT:-$root/gpu_out}
mkdir -p "$outdir"
pack=${JRS_GPU_PACK:-$root/gpu_pack}
limit=${JRS_GPU_TRAIN_TIMEOUT:-585}

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    >"$outdir/nvidia-smi.csv" 2>&1 || true
fi
cd "$root"
export PYTHONUNBUFFERED=1
# JRS_GPU_ENTRY: the module (and subcommand) to run; research/gpu/gpu_table3.sh sets it
read -r -a entry <<<"${JRS_GPU_ENTRY:-research.gpu.gpu_run}"
exec timeout --kill-after=10 "$limit" "$python" -m "${entry[@]}" \
  --pack "$pack" --out "$outdir" "$@"
