#!/bin/bash
# Real MSD Hippocampus, 3d_fullres fold 0, trained ~25 min on a small CPU (benchmarks/RESULTS.md).
# Usage: bash benchmarks/train_hippocampus_cpu.sh [WORKDIR]   (reads ../shared/datasets/msd_hippocampus)
set -euo pipefail
W=${1:-/tmp/autoseg_hippocampus_cpu}
SRC=$(cd "$(dirname "$0")/../.." && pwd)/shared/datasets/msd_hippocampus
ROOTS="--raw $W/raw --preprocessed $W/pre --results $W/res"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$W"
time autoseg $ROOTS convert-msd "$SRC" --id 4
time autoseg $ROOTS plan 4 -j 2
time autoseg $ROOTS preprocess 4 --configs 3d_fullres -j 2
time autoseg $ROOTS train 4 3d_fullres 0 --device cpu --quiet --set batch_size=2 --set epochs=36 \
  --set iterations_per_epoch=20 --set val_iterations=4 --set num_workers=1
