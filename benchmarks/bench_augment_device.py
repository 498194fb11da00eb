"""Batched device augmentation (`autoseg.data.augment_device`) vs the per-sample CPU path: samples per CPU-second.

Real MSD Hippocampus images and labels (z-scored, zero-padded, random initial patches cut in
numpy outside the timing) at the 3d_fullres shape: patch 40x56x40, the initial patch from
`augmentation_setup`, batch 9, one channel, labels 0..2, nnU-Net's default probabilities drawn by
`sample_params`. Timed with one torch thread, best of ``--repeat`` passes over the same batches
(the machine may be shared); on CUDA the figure is samples per wall-second (synchronized per
pass). Also prints the time of each transform alone (params of the drawn batches with
everything else removed, minus the crop-only time).

    python benchmarks/bench_augment_device.py [--device cpu] [--batches 40] [--cases 20] [--repeat 3]
                                              [--no-cpu-path]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.data.augment import (  # noqa: E402
    AugmentConfig,
    AugParams,
    augmentation_setup,
    sample_params,
)
from autoseg.data.augment_cpu import apply_augmentation  # noqa: E402
from autoseg.data.augment_device import augment_batch  # noqa: E402
from benchmarks.common import git_commit  # noqa: E402
from tests.data.conftest import make_config  # noqa: E402
from tests.helpers import HIPPOCAMPUS_MSD, hippocampus_case_ids  # noqa: E402

PATCH = (40, 56, 40)
BATCH = 9

TRANSFORMS = {
    "rotation/scaling": ("rotation_rad", "scale"), "noise": ("noise_std",), "blur": ("blur_sigma",),
    "brightness": ("brightness",), "contrast": ("contrast",), "lowres": ("lowres_zoom",),
    "gamma (both)": ("gamma_inverted", "gamma"), "mirror": ("mirror_axes",),
}


def load_cases(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    cases = []
    for cid in hippocampus_case_ids(n):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS_MSD / "imagesTr" / f"{cid}.nii.gz")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS_MSD / "labelsTr" / f"{cid}.nii.gz")))
        image = ((image - image.mean()) / image.std()).astype(np.float32)
        cases.append((image, label.astype(np.int8)))
    return cases


def cut(rng: np.random.Generator, case: tuple[np.ndarray, np.ndarray], size: tuple[int, ...]):
    """A random initial patch, zero-padded where it leaves the case (as sampling.py does)."""
    image, label = case
    data, seg = np.zeros((1,) + size, np.float32), np.zeros((1,) + size, np.int8)
    starts = [int(rng.integers(min(0, s - p), max(0, s - p) + 1)) for s, p in zip(image.shape, size)]
    src = tuple(slice(max(b, 0), min(b + p, s)) for b, p, s in zip(starts, size, image.shape))
    dst = tuple(slice(r.start - b, r.stop - b) for r, b in zip(src, starts))
    data[(0,) + dst], seg[(0,) + dst] = image[src], label[src]
    return data, seg


def only(params: AugParams, fields: tuple[str, ...]) -> AugParams:
    empty = AugParams()
    return dataclasses.replace(empty, **{f: getattr(params, f) for f in fields})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="passes; the fastest counts")
    parser.add_argument("--no-cpu-path", action="store_true", help="skip timing apply_augmentation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    setup = augmentation_setup(make_config(PATCH, ((1, 1, 1), (2, 2, 2))), AugmentConfig())
    rng = np.random.default_rng(0)
    cases = load_cases(args.cases)
    batches = []
    for _ in range(args.batches):
        samples = [cut(rng, cases[int(rng.integers(len(cases)))], setup.initial_patch_size) for _ in range(BATCH)]
        params = [sample_params(rng, setup, 1) for _ in range(BATCH)]
        batches.append((torch.from_numpy(np.stack([d for d, _ in samples])).to(device),
                        torch.from_numpy(np.stack([s for _, s in samples])).to(device), params, samples))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def run(transform_params) -> float:
        augment_batch(batches[0][0], batches[0][1], transform_params(batches[0][2]), setup)  # warm-up
        times = []
        for _ in range(args.repeat):
            sync()
            start = clock()
            for data, seg, params, _ in batches:
                augment_batch(data, seg, transform_params(params), setup)
            sync()
            times.append(clock() - start)
        return min(times)

    n = args.batches * BATCH
    before, faults = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    total = run(lambda ps: ps)
    after, faults = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    passes = args.batches * (args.repeat + 1)
    print(f"commit {git_commit()}  device {device}  patch {PATCH} initial {setup.initial_patch_size} batch {BATCH}")
    print(f"augment_batch: {n / total:.0f} samples per {'wall' if device.type == 'cuda' else 'CPU'}-second "
          f"({1000 * total / args.batches:.1f} ms per batch; per batch over all passes: user "
          f"{1000 * (after.user - before.user) / passes:.1f} ms, system "
          f"{1000 * (after.system - before.system) / passes:.1f} ms, {faults / passes:.0f} page faults)")
    crop = run(lambda ps: [AugParams() for _ in ps])
    print(f"  crop only: {1000 * crop / args.batches:.2f} ms per batch")
    for name, fields in TRANSFORMS.items():
        alone = run(lambda ps, fields=fields: [only(p, fields) for p in ps])
        selected = sum(only(p, fields) != AugParams() for _, _, ps, _ in batches for p in ps)
        print(f"  {name:17s} +{1000 * (alone - crop) / args.batches:6.2f} ms per batch "
              f"({selected / n:.0%} of samples)")
    if not args.no_cpu_path:
        start = time.process_time()
        for _, _, params, samples in batches:
            for (d, s), p in zip(samples, params):
                apply_augmentation(d, s, p, setup)
        cpu = time.process_time() - start
        print(f"apply_augmentation (CPU path, per sample): {n / cpu:.0f} samples per CPU-second")


if __name__ == "__main__":
    main()
