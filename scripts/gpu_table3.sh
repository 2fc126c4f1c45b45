#!/usr/bin/env bash
# The paper's Table 3 on a lent GPU, in one call of at most 10 minutes (docs/training.md, "Table 3
# on a lent GPU"): Seg, Reg, JRS-reg and Cross-stitch resume their step-0 checkpoints
# (gpu_pack/table3/<network>.pt, from `python -m training.gpu_table3 init`) and train in lockstep
# with CUDA AMP on the packed crops (carried as gpu_pack/), the same number of steps each, for at
# most 8 minutes of wall time. Into $OUT: <network>.pt (4 checkpoints), table3_summary.json,
# table3_logs.tar.gz, table3_train.log and nvidia-smi.csv (8 files at most come back).
# It needs only torch, numpy, scipy and pyyaml. `--dry-run` runs the same code on the CPU with a
# few steps (tested in tests/training/test_gpu_table3.py).
#
# usage: scripts/gpu_table3.sh [--dry-run] [more `python -m training.gpu_table3 run` options,
#        e.g. --minutes 7 --max-steps 2000 --workers 12]
# environment:
#   PYTHON       interpreter with torch (default: .venv/bin/python, else python3)
#   OUT          output folder (default: gpu_out/ in the repository)
#   JRS_GPU_PACK the pack folder (default: gpu_pack/ in the repository)
#   JRS_GPU_TRAIN_TIMEOUT  hard limit in seconds (default 585, under the 600 s of one call)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
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
exec timeout --kill-after=10 "$limit" "$python" -m training.gpu_table3 run \
  --pack "$pack" --out "$outdir" "$@"
