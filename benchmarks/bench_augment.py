"""Augmentation throughput: samples per CPU-second of the CPU path and of the device path.

Real MSD Hippocampus (all 260 cases planned, so the plans are nnU-Net's: 3d_fullres patch
40x56x40 batch 9, 2d 56x40 batch 366). For each configuration the same loader (same seed, same
per-sample parameters) runs with ``augment.device=cpu`` (per sample, numpy/scipy, as the data
workers do it) and ``augment.device=device`` (the worker only crops; the batch is augmented as
torch ops), both in this one process with one thread, so CPU-seconds are per core. On CUDA the
device path also runs on the GPU (wall-clock samples/s with this single core feeding it).
Deep-supervision targets are made in every case, as in training.

    python benchmarks/bench_augment.py [--workdir /tmp/autoseg_bench_hippocampus] [--batches 10]
                                       [--configs 3d_fullres 2d] [--json out.json]

nnU-Net 2.8.1's pipeline, measured on this machine kind (issue 11): about 78 samples per
CPU-second for 3d_fullres and 600 for 2d.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.data.augment import AugmentConfig  # noqa: E402
from autoseg.data.loader import LoaderSpec, make_train_loader  # noqa: E402
from autoseg.splits import fold_cases, load_splits  # noqa: E402
from benchmarks.common import HIPPOCAMPUS, git_commit, prepare_hippocampus  # noqa: E402

NNUNET_SAMPLES_PER_CPU_S = {"3d_fullres": 78.0, "2d": 600.0}
"""nnU-Net 2.8.1's loader + augmentation on this 2-core machine kind (issue 11's measurement)."""


def measure(spec: LoaderSpec, device: str, batches: int) -> dict[str, float]:
    """Samples/s and samples per CPU-second over ``batches`` batches after two warm-up batches."""
    with make_train_loader(spec, device) as loader:
        for _ in range(2):
            next(loader)
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            batch = next(loader)
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = batches * spec.batch_size
    assert batch["data"].shape[0] == spec.batch_size
    return {"samples_per_s": n / wall, "samples_per_cpu_s": n / cpu, "batch_ms": 1000 * wall / batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/autoseg_bench_hippocampus"))
    ap.add_argument("--cases", type=int, default=0, help="0 = all 260 (the plans depend on the cases)")
    ap.add_argument("--configs", nargs="+", default=["3d_fullres", "2d"])
    ap.add_argument("--batches", type=int, default=10, help="timed batches per path")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # per-core figures: one thread, as one data worker has
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    paths, plan = prepare_hippocampus(args.workdir, args.cases, tuple(args.configs))
    train_ids, _ = fold_cases(load_splits(paths, HIPPOCAMPUS), 0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name in args.configs:
        config = plan.configuration(name)
        base = LoaderSpec(data_dir=paths.preprocessed_data(HIPPOCAMPUS, config.data_identifier),
                          case_ids=tuple(train_ids), config=config, augment=AugmentConfig(),
                          batch_size=config.batch_size, num_workers=0, seed=0, deep_supervision=True,
                          pin_memory=torch.cuda.is_available())
        for path in ("cpu", "device"):
            for device in devices if path == "device" else ["cpu"]:
                spec = dataclasses.replace(base, augment=dataclasses.replace(base.augment, device=path))
                fig = measure(spec, device, args.batches)
                rows.append({"config": name, "patch": list(config.patch_size), "batch": config.batch_size,
                             "path": path, "device": device, **fig,
                             "vs_nnunet_per_core": fig["samples_per_cpu_s"] / NNUNET_SAMPLES_PER_CPU_S[name]})
                print(f"{name:10s} batch {config.batch_size:3d}  path {path:6s} on {device:4s}: "
                      f"{fig['samples_per_s']:8.1f} samples/s  {fig['samples_per_cpu_s']:8.1f} samples/CPU-s  "
                      f"({rows[-1]['vs_nnunet_per_core']:.2f}x nnU-Net's per-core rate)", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "batches": args.batches}
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
