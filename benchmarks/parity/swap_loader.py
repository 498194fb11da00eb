"""Bisection tool: autoseg's training loop fed by nnU-Net 2.8.1's data loader and transforms.

If a run of this learns like nnU-Net, the difference is in autoseg's data pipeline; if it learns
like autoseg, it is in the loop, the network or their initialisation. Needs nnunetv2 importable
(see README's test command) and both frameworks' preprocessed data of the same raw dataset:

    python benchmarks/parity/swap_loader.py --roots W --nnunet-preprocessed NN_PRE/Dataset004_Hippocampus \
        --variant nnloader --set batch_size=2 --set epochs=9 --set iterations_per_epoch=20
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

import autoseg.data.loader as loader_module
from autoseg.common.paths import Paths, TrainingId
from autoseg.pipeline.run import train_fold
from autoseg.train.config import TrainerConfig, apply_overrides


class _Batches:
    """nnU-Net's loader as the iterator autoseg's fit expects (``close`` included)."""

    def __init__(self, dl: object) -> None:
        self.dl = dl

    def __iter__(self) -> "_Batches":
        return self

    def __next__(self) -> dict:
        b = next(self.dl)
        return {"data": b["data"], "target": b["target"]}

    def close(self) -> None:
        pass


def nnunet_train_loader(pre: Path, config: str):
    """A replacement for `make_train_loader` that builds nnU-Net's training loader for the spec's cases."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    labels = PlansManager(str(pre / "nnUNetPlans.json")).get_label_manager(json.loads((pre / "dataset.json").read_text()))

    def make(spec):  # noqa: ANN001, ANN202 - same signature as autoseg.data.loader.make_train_loader
        patch = tuple(spec.config.patch_size)
        rot = (-np.pi / 6, np.pi / 6) if len(patch) == 3 else (-np.pi, np.pi)
        initial = get_patch_size(patch, rot, rot, rot, (0.85, 1.25))
        scales = [[1.0 / np.prod([s[a] for s in spec.config.strides[:i + 1]]) for a in range(len(patch))]
                  for i in range(len(spec.config.strides) - 1)]
        transforms = nnUNetTrainer.get_training_transforms(
            patch, rot, scales, tuple(range(len(patch))), False, use_mask_for_norm=[False], is_cascaded=False,
            foreground_labels=labels.foreground_labels, regions=None, ignore_label=None)
        ds = nnUNetDatasetBlosc2(str(pre / f"nnUNetPlans_{config}"), identifiers=list(spec.case_ids))
        np.random.seed(spec.seed)
        torch.manual_seed(spec.seed)
        return _Batches(nnUNetDataLoader(ds, spec.batch_size, initial, patch, labels, oversample_foreground_percent=0.33,
                                         transforms=transforms))
    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roots", type=Path, required=True, help="autoseg work dir with raw/ pre/ res/")
    ap.add_argument("--nnunet-preprocessed", type=Path, required=True)
    ap.add_argument("--dataset", default="Dataset004_Hippocampus")
    ap.add_argument("--config", default="3d_fullres")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--variant", default="nnloader")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    loader_module.make_train_loader = nnunet_train_loader(args.nnunet_preprocessed, args.config)
    paths = Paths(raw=args.roots / "raw", preprocessed=args.roots / "pre", results=args.roots / "res")
    cfg = apply_overrides(TrainerConfig(), args.overrides)
    print(train_fold(paths, TrainingId(args.dataset, args.config, args.fold, variant=args.variant), cfg,
                     device="cpu", quiet=True))


if __name__ == "__main__":
    main()
