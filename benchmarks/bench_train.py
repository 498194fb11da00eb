"""Training throughput: iterations/s and the share of step time spent waiting for data.

Real MSD Hippocampus, 3d_fullres at the planned patch and batch size, through the real
training loop (`autoseg.train.loop.fit`: augmentation workers, loss, SGD step, AMP and
compile as chosen). Epoch 1 warms up (worker start, cuDNN autotuning, torch.compile);
the figures are those of epoch 2. Runs on the GPU when one is present, else on the CPU.

    python benchmarks/bench_train.py [--device auto] [--workers 4] [--amp auto] [--compile auto]
                                     [--augment-device auto] [--iterations 20] [--batch-size N]
                                     [--workdir DIR] [--cases 0] [--threads N] [--json out.json]

With ``--workdir`` the planned and preprocessed dataset is kept there and reused, so several
runs (benchmarks/gpu_check.sh packs 2 and 4 on one GPU) share one preprocessing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.data.augment import resolve_augment_device  # noqa: E402
from autoseg.data.loader import LoaderSpec, make_train_loader  # noqa: E402
from autoseg.nets.unet import build_unet, deep_supervision_scales  # noqa: E402
from autoseg.splits import fold_cases, load_splits  # noqa: E402
from autoseg.train.config import TrainerConfig  # noqa: E402
from autoseg.train.loop import FitSetup, RunMeta, fit, resolve_runtime  # noqa: E402
from autoseg.train.losses import build_loss  # noqa: E402
from benchmarks.common import HIPPOCAMPUS as DATASET  # noqa: E402
from benchmarks.common import git_commit, prepare_hippocampus  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--workers", type=int, default=4, help="data-augmentation worker processes")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--iterations", type=int, default=20, help="timed iterations (after as many warm-up ones)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the plan's")
    ap.add_argument("--augment-device", default="auto", choices=["auto", "cpu", "device"],
                    help="where augmentation runs (augment.device)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep and reuse the preprocessed data here")
    ap.add_argument("--cases", type=int, default=0, help="Hippocampus training cases (0 = all 260: nnU-Net's plan)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_train_")))
        paths, plan = prepare_hippocampus(args.workdir or tmp / "data", args.cases, ("3d_fullres",),
                                          max(1, args.workers))
        config = plan.configuration("3d_fullres")
        train_ids, _ = fold_cases(load_splits(paths, DATASET), 0)
        cfg = TrainerConfig(epochs=2, iterations_per_epoch=args.iterations, val_iterations=0,
                            batch_size=args.batch_size, amp=args.amp, compile=args.compile)
        cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, device=args.augment_device))
        rt = resolve_runtime(cfg, args.device, quiet=True)
        rec_device = resolve_augment_device(cfg.augment.device, rt.device.type)
        batch = cfg.batch_size or config.batch_size
        spec = LoaderSpec(data_dir=paths.preprocessed_data(DATASET, config.data_identifier), case_ids=tuple(train_ids),
                          config=config, augment=cfg.augment, batch_size=batch, num_workers=args.workers,
                          seed=0, deep_supervision=True, pin_memory=rt.device.type == "cuda")
        loader = make_train_loader(spec, rt.device)
        net = build_unet(config, plan.num_channels, plan.num_classes, deep_supervision=True)
        meta = RunMeta(plan, "3d_fullres", DATASET, 0, plan.num_channels, plan.num_classes)
        setup = FitSetup(net=net, loss_fn=build_loss(cfg.loss, config.batch_dice, len(deep_supervision_scales(config))),
                         train_batches=loader, val_batches=loader, cfg=cfg, meta=meta,
                         out_dir=tmp / "run", rng=np.random.default_rng(0), augment_device=rec_device)
        setup.out_dir.mkdir()
        try:
            result = fit(setup, rt)
        finally:
            loader.close()
    rec = result.history[-1]
    device_name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "CPU"
    amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[rt.amp_dtype]
    print(f"date {datetime.date.today()}  commit {git_commit()}  torch {torch.__version__}  "
          f"cuda {torch.version.cuda}  device {device_name}  threads {torch.get_num_threads()}")
    print(f"Hippocampus 3d_fullres patch {config.patch_size} batch {batch}  workers {args.workers}  "
          f"amp {amp}  compile {rt.compile}  iterations {args.iterations}")
    print(f"augmentation on {rec_device}  iterations/s {rec['iterations_per_s']:.3f}   "
          f"data wait {100 * rec['data_wait_fraction']:.1f} % of step time")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "commit": git_commit(), "device": device_name,
            "torch": torch.__version__, "patch": list(config.patch_size), "batch": batch, "workers": args.workers,
            "augment_device": rec_device, "amp": amp, "compile": rt.compile, "iterations": args.iterations,
            "iterations_per_s": rec["iterations_per_s"], "data_wait_fraction": rec["data_wait_fraction"]},
            indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
