#!/usr/bin/env bash
# Side by side with nnU-Net 2.8.1 (see harness.py). Example (the figures in benchmarks/RESULTS.md):
#   bash benchmarks/parity/run.sh --dataset hippocampus --config 3d_fullres --iterations 180 360 --seeds 0 1
# nnunetv2 goes into its own venv (PARITY_VENV, default /tmp/autoseg_parity/nnunet-venv): a benchmark
# tool, never a dependency of autoseg. The venv sees this Python's site-packages for torch (the CPU
# wheel installed by the README's command) and installs nnunetv2 and its pure-Python helpers without
# dependencies, so its torchvision/timm chain cannot replace that torch.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${PARITY_VENV:-/tmp/autoseg_parity/nnunet-venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} PYTHONUTF8=1
if [ ! -x "$VENV/bin/nnUNetv2_train" ]; then
  python3 -m venv --system-site-packages "$VENV"
  "$VENV/bin/python" -m pip install -q --no-deps --ignore-installed nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 \
    batchgeneratorsv2==0.3.6 acvl-utils==0.2.6
  "$VENV/bin/python" -c "import nibabel, blosc2, seaborn" 2>/dev/null ||
    "$VENV/bin/python" -m pip install -q "nibabel>=5.0" "blosc2>=3.3.2" "seaborn>=0.13"
fi
NNDIR=$("$VENV/bin/python" -c "import nnunetv2.training.nnUNetTrainer as m, os; print(os.path.dirname(m.__file__))")
cp "$HERE/nnUNetTrainer_Budget.py" "$NNDIR/"
exec python3 "$HERE/harness.py" --nnunet-bin "$VENV/bin" --command "bash benchmarks/parity/run.sh $*" "$@"
