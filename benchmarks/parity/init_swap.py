"""Bisection tool: nnU-Net 2.8.1's own trainer started from autoseg's initial weights.

nnU-Net's ``run_training`` (its loader, augmentation, loop, schedule; final validation skipped)
with the network's parameters replaced, before the first step, by those of autoseg's U-Net as
``train`` builds it for ``--seed`` (``--head-init he`` = nnU-Net's own init rule; ``prior`` =
autoseg's default). ``--nnunet-init`` keeps nnU-Net's own init, seeded. The per-epoch loss and
pseudo-Dice land in nnU-Net's training_log under ``--out``. Needs nnunetv2 importable and both
frameworks' preprocessed data (``nnUNet_preprocessed`` set, batch from ``--batch-size``):

    nnUNet_preprocessed=NN_PRE nnUNet_raw=NN_RAW nnUNet_n_proc_DA=0 python benchmarks/parity/init_swap.py \
        --autoseg-preprocessed PRE --seed 0 --out /tmp/swap_s0
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "parity"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--autoseg-preprocessed", type=Path, required=True, help="autoseg's preprocessed root")
    ap.add_argument("--dataset", default="Dataset004_Hippocampus")
    ap.add_argument("--config", default="3d_fullres")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--head-init", choices=("he", "prior"), default="he")
    ap.add_argument("--nnunet-init", action="store_true", help="keep nnU-Net's own (seeded) init")
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--iterations-per-epoch", type=int, default=20)
    ap.add_argument("--val-iterations", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="nnUNet_results for this run")
    a = ap.parse_args()
    os.environ["nnUNet_results"] = str(a.out)

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from autoseg.infer.nnunet_keys import autoseg_key

    from autoseg.common.paths import Paths
    from autoseg.data.sampling import class_voxel_counts
    from autoseg.nets.unet import build_unet, init_heads_to_prior
    from autoseg.planning.store import load_plan_file
    from autoseg.splits import fold_cases, load_splits

    def autoseg_init() -> dict[str, torch.Tensor]:
        """The weights autoseg's train_fold starts fold 0 from (same seeding order)."""
        pre = a.autoseg_preprocessed / a.dataset
        plan = load_plan_file(pre / "plans.json")
        config = plan.configuration(a.config)
        torch.manual_seed(a.seed)
        net = build_unet(config, plan.num_channels, plan.num_classes)
        if a.head_init == "prior":
            paths = Paths(raw=Path("/nonexistent"), preprocessed=a.autoseg_preprocessed, results=a.out)
            train_ids, _ = fold_cases(load_splits(paths, a.dataset), 0)
            init_heads_to_prior(net, class_voxel_counts(pre / config.data_identifier, train_ids, plan.num_classes))
        return net.state_dict()

    class Trainer(nnUNetTrainer):
        def __init__(self, plans, configuration, fold, dataset_json, device=None):  # noqa: ANN001
            plans["configurations"][configuration]["batch_size"] = a.batch_size
            super().__init__(plans, configuration, fold, dataset_json, device=device)
            self.num_epochs, self.num_iterations_per_epoch = a.epochs, a.iterations_per_epoch
            self.num_val_iterations_per_epoch, self.save_every = a.val_iterations, 10**6

        def on_train_start(self) -> None:
            super().on_train_start()
            if not a.nnunet_init:
                ours = autoseg_init()
                with torch.no_grad():
                    for key, p in self.network.named_parameters():
                        p.copy_(ours[autoseg_key(key, residual=False)])

    nn_pre = Path(os.environ["nnUNet_preprocessed"]) / a.dataset
    plans = load_json(str(nn_pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    trainer = Trainer(plans, a.config, 0, load_json(str(nn_pre / "dataset.json")), device=torch.device("cpu"))
    trainer.run_training()


if __name__ == "__main__":
    main()
