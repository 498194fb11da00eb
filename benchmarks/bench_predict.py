"""Prediction throughput (cases/s) on real MSD Hippocampus, 3d_fullres, with and without mirroring TTA.

An untrained network of the planned topology (full width) is used: speed does not depend
on the weights. Each case goes the full way (read, preprocess, sliding window, revert,
argmax); writing is left out. Runs on the GPU when one is present, else on the CPU.

    python benchmarks/bench_predict.py [--cases 10] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.common.paths import Paths  # noqa: E402
from autoseg.dataset.spec import load_dataset  # noqa: E402
from autoseg.fingerprint import extract_fingerprint  # noqa: E402
from autoseg.infer.predict import LoadedModel, PredictOptions, predict_case, resolve_device  # noqa: E402
from autoseg.nets.unet import build_unet  # noqa: E402
from autoseg.planning.plan import plan_dataset  # noqa: E402
from benchmarks.common import git_commit  # noqa: E402
from tests.helpers import hippocampus_available, hippocampus_case_ids, link_hippocampus_subset  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10, help="cases timed per setting (after 1 warm-up)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if not hippocampus_available():
        sys.exit("MSD Hippocampus not found under ../shared/datasets/msd_hippocampus")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths.under(Path(tmp))
        ids = hippocampus_case_ids(args.cases + 1)
        link_hippocampus_subset(paths.raw, ids)
        spec = load_dataset(paths.raw_dataset("Dataset004_Hippocampus"))
        plan = plan_dataset(extract_fingerprint(spec))
        config = plan.configuration("3d_fullres")
        net = build_unet(config, plan.num_channels, plan.num_classes, deep_supervision=False).to(device).eval()
        model = LoadedModel([net], plan, config, tuple(range(config.ndim)), device)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
        print(f"device {device} (GPU: {gpu}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"threads {torch.get_num_threads()}, commit {git_commit()}")
        print(f"3d_fullres patch {config.patch_size}, features {config.features_per_stage}, {args.cases} cases")
        for tta in (False, True):
            options = PredictOptions(tta=tta)
            predict_case([model], spec.cases[0].images, options)  # warm-up (allocations, cudnn autotune)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for case in spec.cases[1:]:
                predict_case([model], case.images, options)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            print(f"TTA {'on ' if tta else 'off'}: {args.cases / dt:.2f} cases/s ({dt / args.cases * 1000:.0f} ms/case)")


if __name__ == "__main__":
    main()
