#!/usr/bin/env bash
# The paper's Table 3 on a lent GPU, in one call of at most 10 minutes (docs/training.md, "Table
# 3"): Seg, Reg, JRS-reg and Cross-stitch resume their step-0 checkpoints (the pack's own and
# gpu_pack/table3/<network>.pt, from `python -m research.gpu.gpu_table3 init`) and train in lockstep
# with CUDA AMP on the packed crops (carried as gpu_pack/), the same number of steps each, for at
# most 8 minutes of wall time. Into $OUT: <network>.pt (4 checkpoints), table3_summary.json,
# table3_logs.tar.gz, table3_train.log and nvidia-smi.csv (8 files at most come back).
# It is research/gpu/gpu_train.sh (same interpreter, pack, output folder and hard limit of
# JRS_GPU_TRAIN_TIMEOUT:-585 s) running `python -m research.gpu.gpu_table3 run`. `--dry-run` runs the
# same code on the CPU with a few steps (tested in tests/training/test_gpu_table3.py).
#
# usage: research/gpu/gpu_table3.sh [--dry-run] [more `python -m research.gpu.gpu_table3 run` options,
#        e.g. --minutes 7 --max-steps 2000 --workers 12]
set -euo pipefail
JRS_GPU_ENTRY="research.gpu.gpu_table3 run" exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_train.sh" "$@"
