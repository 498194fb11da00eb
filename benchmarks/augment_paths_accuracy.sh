#!/bin/bash
# Accuracy is not traded (issue 11): real MSD Hippocampus 3d_fullres fold 0, trained on the CPU with the
# same seed and budget (18 epochs x 20 iterations = 360, batch 2) once with augmentation in the CPU
# workers (augment.device=cpu) and once batched as torch ops (augment.device=device, here on the CPU),
# the two runs side by side with one core each; then the validation Dice of both (52 held-out cases).
# Usage: bash benchmarks/augment_paths_accuracy.sh [WORKDIR] [EPOCHS]   (reads ../shared/datasets/msd_hippocampus)
set -euo pipefail
W=${1:-/tmp/autoseg_augment_paths}
EPOCHS=${2:-18}
SRC=$(cd "$(dirname "$0")/../.." && pwd)/shared/datasets/msd_hippocampus
ROOTS="--raw $W/raw --preprocessed $W/pre --results $W/res"
mkdir -p "$W"
[ -d "$W/raw/Dataset004_Hippocampus" ] || autoseg $ROOTS convert-msd "$SRC" --id 4
autoseg $ROOTS plan 4 -j 2 --configs 3d_fullres
autoseg $ROOTS preprocess 4 --configs 3d_fullres -j 2
SETS="--set batch_size=2 --set epochs=$EPOCHS --set iterations_per_epoch=20 --set val_iterations=4 --set num_workers=1 --set seed=0"
for path in cpu device; do
  OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE /usr/bin/time -v -o "$W/time_$path.txt" \
    autoseg $ROOTS train 4 3d_fullres 0 --device cpu --quiet --variant "aug_$path" $SETS \
    --set augment.device=$path > "$W/train_$path.log" 2>&1 &
done
wait
python3 - "$W" <<'PY'
import json, sys, pathlib
w = pathlib.Path(sys.argv[1])
for path in ("cpu", "device"):
    fold = next(p for p in (w / "res").rglob("fold_0") if f"aug_{path}" in str(p))
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    log = [json.loads(l) for l in (fold / "training_log.jsonl").read_text().splitlines()]
    print(f"augment.device={path:6s} iterations {sum(1 for _ in log) * 20}  "
          f"validation Dice {json.dumps(summary.get('foreground_mean', summary.get('mean')))[:200]}  "
          f"train CPU-s/it {sum(r['train_cpu_s'] for r in log) / (20 * len(log)):.2f}  "
          f"augment_device in log: {sorted({r['augment_device'] for r in log})}")
PY
