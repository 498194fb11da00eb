#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most ~8 minutes on one H100/H200 (issue 11):
#   1. the gpu-marked tests;
#   2. bench_augment: samples/s of the CPU path, the device path on the CPU and on the GPU;
#   3. Hippocampus 3d_fullres training iterations/s (real data, planned batch 9): CPU augmentation with
#      1, 4 and 12 workers, device augmentation with 1 worker;
#   4. the same (device augmentation, 1 worker each) with 2 and 4 jobs packed on the one GPU;
#   5. bf16 and torch.compile on/off;
#   6. predict volumes/s.
# Writes $OUT/gpu_check.json and $OUT/gpu_check.md (a RESULTS.md section); logs in $OUT/logs/.
# Usage: OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh   (ITER=20 timed iterations per run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/autoseg_gpu_check}
ITER=${ITER:-20}
WORK=${WORK:-/tmp/autoseg_bench_hippocampus}
mkdir -p "$OUT/logs" "$OUT/runs"
export PYTHONUTF8=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/autoseg_inductor_cache}
started=$(date +%s)
step() { echo "[$(( $(date +%s) - started ))s] $*"; }

python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  || { echo "gpu_check: no CUDA device visible"; exit 2; }

step "1/6 gpu tests"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/logs/pytest_gpu.log" 2>&1
echo $? > "$OUT/runs/pytest_gpu.rc"; tail -3 "$OUT/logs/pytest_gpu.log"

step "2/6 bench_augment (prepares $WORK: all 260 cases, 3d_fullres + 2d)"
timeout 200 python3 benchmarks/bench_augment.py --workdir "$WORK" --batches 20 --json "$OUT/runs/augment.json" \
  > "$OUT/logs/augment.log" 2>&1; tail -7 "$OUT/logs/augment.log"

train() {  # NAME ARGS...: one bench_train run into runs/NAME.json
  local name=$1; shift
  timeout 150 python3 benchmarks/bench_train.py --workdir "$WORK" --iterations "$ITER" --json "$OUT/runs/$name.json" \
    "$@" > "$OUT/logs/$name.log" 2>&1
  tail -1 "$OUT/logs/$name.log"
}
step "3/6 training: CPU augmentation 1/4/12 workers, device augmentation 1 worker (bf16, no compile)"
for w in 1 4 12; do train "cpu_aug_w$w" --augment-device cpu --workers "$w" --compile false; done
train device_aug_w1 --augment-device device --workers 1 --compile false

step "4/6 packed: 2 and 4 jobs on one GPU (device augmentation, 1 worker, 2 cores each)"
for n in 2 4; do
  pids=()
  for k in $(seq 1 "$n"); do
    c0=$(( (k - 1) * 2 )); c1=$(( c0 + 1 ))
    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE taskset -c "$c0-$c1" timeout 200 python3 benchmarks/bench_train.py \
      --workdir "$WORK" --iterations "$ITER" --augment-device device --workers 1 --compile false --threads 2 \
      --json "$OUT/runs/packed${n}_job$k.json" > "$OUT/logs/packed${n}_job$k.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  tail -q -n 1 "$OUT"/logs/packed"${n}"_job*.log
done

step "5/6 precision and compile (device augmentation, 1 worker)"
train amp_off_compile_off --augment-device device --workers 1 --amp off --compile false
train bf16_compile_on --augment-device device --workers 1 --amp bf16 --compile true

step "6/6 predict"
timeout 120 python3 benchmarks/bench_predict.py --cases 10 --device cuda > "$OUT/logs/predict.log" 2>&1
tail -3 "$OUT/logs/predict.log"

step "report"
python3 benchmarks/gpu_check_report.py "$OUT"
step "done"
