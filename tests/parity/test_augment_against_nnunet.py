"""Differential test: autoseg's training batches against nnU-Net 2.8.1's loader and transforms.

Both sample patches from the same preprocessed cases (an isotropic phantom: an organ and a
brighter lesion on noise) with their default augmentation pipelines (rotation, scaling, noise,
blur, brightness, contrast, low resolution, gamma, mirroring; 33 % forced foreground), and the
distributions of what comes out are compared: image intensities, class shares of the targets,
the image intensity inside each label (a spatial transform applied differently to image and
labels would blur these apart), and the deep-supervision target shapes. Tolerances are a few
times the seed-to-seed spread of these statistics over this many patches (measured 2026-12-04).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnunetv2 (the parity reference) is not installed; see README")
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size  # noqa: E402
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader  # noqa: E402
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.label_handling.label_handling import LabelManager  # noqa: E402

from autoseg.common.paths import Paths  # noqa: E402
from autoseg.data.augment import AugmentConfig  # noqa: E402
from autoseg.data.loader import LoaderSpec, make_train_loader  # noqa: E402
from autoseg.dataset.phantom import LABELS, PhantomRecipe, make_phantom_dataset  # noqa: E402
from autoseg.nets.unet import deep_supervision_scales  # noqa: E402
from autoseg.planning.plan import apply_plan_overrides  # noqa: E402
from autoseg.planning.planner import PlanRequest, plan_and_save  # noqa: E402
from autoseg.preprocess import list_preprocessed_cases, load_preprocessed_case, preprocess_dataset  # noqa: E402

DATASET = "Dataset997_AugParity"
PATCH = (24, 32, 24)
BATCHES = 40
BATCH = 2


def _stats(batches: list[tuple[np.ndarray, list[np.ndarray]]]) -> dict[str, np.ndarray]:
    img = np.concatenate([d.ravel() for d, _ in batches])
    seg = np.concatenate([t[0].ravel() for _, t in batches])
    return {
        "quantiles": np.quantile(img, [0.05, 0.25, 0.5, 0.75, 0.95]),
        "mean_std": np.array([img.mean(), img.std()]),
        "class_share": np.array([(seg == k).mean() for k in (1, 2)]),
        "intensity_in_label": np.array([img[seg == k].mean() for k in (0, 1, 2)]),
        "ds_shapes": [tuple(t.shape) for t in batches[0][1]],
    }


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("aug_parity")
    paths = Paths.under(root)
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=4, num_test=0, shape=(32, 40, 36), shape_jitter=4,
                                                  spacing=(1.0, 1.0, 1.0), oblique=False), dataset_name=DATASET)
    plan = plan_and_save(paths, DATASET, PlanRequest(configs=("3d_fullres",), progress_bar=False)).plan
    plan = apply_plan_overrides(plan, [f"3d_fullres.patch_size={','.join(map(str, PATCH))}"])
    preprocess_dataset(paths, DATASET, ["3d_fullres"], plan=plan)
    config = plan.configuration("3d_fullres")
    folder = paths.preprocessed_data(DATASET, config.data_identifier)
    cases = list_preprocessed_cases(folder)
    for case in cases:  # nnU-Net's numpy dataset reads CASE.npy / CASE_seg.npy and CASE.pkl
        fg = load_preprocessed_case(folder, case).fg_locations
        locations = {k: np.concatenate([np.zeros((len(v), 1), int), v], 1) for k, v in fg.items()}
        with open(folder / f"{case}.pkl", "wb") as f:
            pickle.dump({"class_locations": locations}, f)
    scales = [list(s) for s in deep_supervision_scales(config)]

    def autoseg_batches(seed: int) -> list:
        loader = make_train_loader(LoaderSpec(data_dir=folder, case_ids=tuple(cases), config=config,
                                              augment=AugmentConfig(), batch_size=BATCH, num_workers=0, seed=seed,
                                              deep_supervision=True))
        try:
            return [(np.asarray(b["data"]), [np.asarray(t) for t in b["target"]])
                    for b in (next(loader) for _ in range(BATCHES))]
        finally:
            loader.close()

    def nnunet_batches(seed: int) -> list:
        rot = (-np.pi / 6, np.pi / 6)  # nnU-Net's 3D rotation range (isotropic patch, no dummy 2D)
        transforms = nnUNetTrainer.get_training_transforms(
            PATCH, rot, scales, (0, 1, 2), False, use_mask_for_norm=[False], is_cascaded=False,
            foreground_labels=[1, 2], regions=None, ignore_label=None)
        labels = LabelManager(dict(LABELS), regions_class_order=None)
        np.random.seed(seed)
        torch.manual_seed(seed)
        dl = nnUNetDataLoader(nnUNetDatasetNumpy(str(folder), identifiers=cases), BATCH,
                              get_patch_size(PATCH, rot, rot, rot, (0.85, 1.25)), PATCH, labels,
                              oversample_foreground_percent=0.33, transforms=transforms)
        return [(b["data"].numpy(), [t.numpy() for t in b["target"]]) for b in (next(dl) for _ in range(BATCHES))]

    torch.set_num_threads(1)
    return {name: [_stats(make(seed)) for seed in (0, 1)]
            for name, make in (("autoseg", autoseg_batches), ("nnunet", nnunet_batches))}


# measured |autoseg - nnU-Net| (seed-to-seed spread within one framework): quantiles 0.09 (0.09),
# mean/std 0.03 (0.06), class shares 0.002 (0.007), intensity per label 0.11 (0.16)
TOLERANCE = {"quantiles": 0.15, "mean_std": 0.1, "class_share": 0.02, "intensity_in_label": 0.2}


@pytest.mark.parametrize("stat", sorted(TOLERANCE))
def test_augmented_batches_match_nnunets_in_distribution(pipelines, stat: str) -> None:  # noqa: ANN001
    ours = np.mean([s[stat] for s in pipelines["autoseg"]], axis=0)
    theirs = np.mean([s[stat] for s in pipelines["nnunet"]], axis=0)
    spread = max(np.abs(a[stat] - b[stat]).max() for a, b in (pipelines["autoseg"], pipelines["nnunet"]))
    print(f"{stat}: autoseg {np.round(ours, 3)}, nnU-Net {np.round(theirs, 3)}, seed spread {spread:.3f}")
    np.testing.assert_allclose(ours, theirs, atol=TOLERANCE[stat], rtol=0)


def test_labels_stay_on_their_structures(pipelines) -> None:  # noqa: ANN001
    for name, runs in pipelines.items():
        for s in runs:
            background, organ, lesion = s["intensity_in_label"]
            assert organ - background > 0.5 and abs(lesion - organ) > 0.2, (name, s["intensity_in_label"])


def test_deep_supervision_targets_have_nnunets_shapes(pipelines) -> None:  # noqa: ANN001
    assert pipelines["autoseg"][0]["ds_shapes"] == pipelines["nnunet"][0]["ds_shapes"]
    assert pipelines["autoseg"][0]["ds_shapes"][0] == (BATCH, 1, *PATCH)
