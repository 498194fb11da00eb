"""Masked normalization as nnU-Net does it: -1 outside the nonzero mask in the preprocessed labels, the
masked channels put back to 0 there after augmentation, -1 trained as background.

The data: brain-like volumes (a bright, noisy ellipsoid in zeros, two labelled structures inside), which
the planner normalizes inside the nonzero mask, and the same volumes on a nonzero background, which it
does not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths
from autoseg.data.augment import (
    AugmentConfig,
    AugParams,
    augmentation_setup,
    restore_masked_background,
)
from autoseg.data.augment_cpu import apply_augmentation
from autoseg.data.loader import LoaderSpec, make_train_loader, make_val_loader
from autoseg.data.sampling import load_foreground, sample_patch
from autoseg.dataset.io import Geometry, read_image, write_image
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.preprocess import (
    SETTINGS_FILENAME,
    PreprocessingSettings,
    crop_to_nonzero,
    list_preprocessed_cases,
    load_preprocessed_case,
    preprocess_dataset,
)

DATASET = "Dataset996_Brainish"
SHAPE = (24, 48, 48)


def _ellipsoid(shape: tuple[int, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def write_brainish_dataset(raw: Path, background: float, num_cases: int = 3) -> None:
    """Cases of SHAPE: an ellipsoid of intensity ~150 +- 20 in ``background`` (0: a skull-stripped brain)."""
    rng = np.random.default_rng(0)
    out = raw / DATASET
    for i in range(num_cases):
        centre = np.array(SHAPE) / 2 + rng.uniform(-2, 2, 3)
        brain = _ellipsoid(SHAPE, centre, np.array([9.0, 18.0, 15.0]) * rng.uniform(0.9, 1.1))
        img = np.where(brain, 150.0 + rng.normal(0, 20, SHAPE), background).astype(np.float32)
        img[brain] = np.maximum(img[brain], 1.0)  # no accidental zeros inside the brain
        label = np.zeros(SHAPE, np.uint8)
        label[_ellipsoid(SHAPE, centre + [0, -6, 0], np.array([4.0, 5.0, 5.0]))] = 1
        label[_ellipsoid(SHAPE, centre + [0, 6, 0], np.array([4.0, 5.0, 5.0]))] = 2
        geom = Geometry(shape=SHAPE, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        write_image(out / "imagesTr" / f"brain_{i:03d}_0000.nii.gz", img, geom)
        write_image(out / "labelsTr" / f"brain_{i:03d}.nii.gz", label, geom)
    meta = {"name": "Brainish", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2},
            "numTraining": num_cases, "file_ending": ".nii.gz"}
    (out / "dataset.json").write_text(json.dumps(meta))


def _preprocess(root: Path, background: float):  # noqa: ANN202
    paths = Paths.under(root)
    write_brainish_dataset(paths.raw, background)
    plan = plan_and_save(paths, DATASET, PlanRequest(configs=("3d_fullres",), progress_bar=False)).plan
    folder = preprocess_dataset(paths, DATASET, ["3d_fullres"], plan=plan)["3d_fullres"]
    return paths, plan, folder


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    paths, plan, folder = _preprocess(tmp_path_factory.mktemp("brainish_masked"), background=0.0)
    assert plan.normalization[0].use_nonzero_mask  # the premise: a zero background is masked out
    return paths, plan, folder


def test_preprocessing_marks_exactly_the_outside_of_the_nonzero_mask(masked) -> None:  # noqa: ANN001
    paths, _, folder = masked
    assert load_record(folder / SETTINGS_FILENAME, PreprocessingSettings).outside_mask_label == -1
    for case in list_preprocessed_cases(folder):
        raw, _ = read_image(paths.raw / DATASET / "imagesTr" / f"{case}_0000.nii.gz")
        bbox, mask = crop_to_nonzero(raw[None])
        pre = load_preprocessed_case(folder, case)
        assert pre.seg.shape[1:] == mask.shape  # 1 mm in, 1 mm out: no resampling, a voxel-exact check
        np.testing.assert_array_equal(pre.seg[0] == -1, ~mask)
        assert (pre.data[0][~mask] == 0).all() and (pre.data[0][mask] != 0).all()
        assert set(np.unique(pre.seg[0][mask]).tolist()) == {0, 1, 2}
        assert all((pre.seg[0][tuple(v.T)] == k).all() for k, v in pre.fg_locations.items())  # -1 is no class


def _patch(folder: Path, case: str, setup, rng: np.random.Generator):  # noqa: ANN001, ANN202
    pre = load_preprocessed_case(folder, case)
    fg = load_foreground(folder / f"{case}_fg.npz")
    return sample_patch(rng, pre.data, pre.seg, fg, setup.initial_patch_size, setup.patch_size, False)


def test_augmentation_zeroes_the_masked_outside_and_leaves_no_minus_one(masked) -> None:  # noqa: ANN001
    _, plan, folder = masked
    config = plan.configuration("3d_fullres")
    setup = augmentation_setup(config, AugmentConfig(), masked_channels=(0,))
    unmasked = augmentation_setup(config, AugmentConfig())
    params = AugParams(rotation_rad=(0.3, -0.2, 0.4), scale=0.8, noise_std=0.1, noise_seed=1, brightness=(1.2,),
                       contrast=(0.8,), gamma=(1.3,), mirror_axes=(1,))
    rng = np.random.default_rng(0)
    for case in list_preprocessed_cases(folder):
        data, seg = _patch(folder, case, setup, rng)
        assert (seg == -1).any()  # the patch reaches outside the brain
        out_d, out_s = apply_augmentation(data.copy(), seg.copy(), params, setup)
        # where the augmented label would be -1: the same transform on labels shifted up by one, unmasked
        _, shifted = apply_augmentation(data.copy(), seg + 1, params, unmasked)
        outside = shifted[0] == 0
        assert 0.05 < outside.mean() < 0.95
        assert (out_d[0][outside] == 0).all()
        assert (out_d[0][~outside] != 0).mean() > 0.999  # noise everywhere else: exact zeros only by masking
        np.testing.assert_array_equal(out_s, np.where(shifted == 0, 0, shifted - 1))
        # unmasked, intensity augmentation moves the background away from 0
        plain_d, plain_s = apply_augmentation(data.copy(), seg.copy(), params, unmasked)
        assert (plain_d[0][outside] != 0).mean() > 0.99 and plain_s.min() == 0


def test_training_and_validation_batches_from_the_folder(masked) -> None:  # noqa: ANN001
    _, plan, folder = masked
    config = plan.configuration("3d_fullres")
    cases = tuple(list_preprocessed_cases(folder))
    spec = LoaderSpec(data_dir=folder, case_ids=cases, config=config, batch_size=4, num_workers=0, seed=0,
                      deep_supervision=False, augment=AugmentConfig(p_noise=1.0, noise_std=(0.05, 0.1)),
                      masked_channels=(0,))
    with make_train_loader(spec) as train, make_val_loader(spec) as val:
        for batch in [next(train) for _ in range(3)] + [next(val)]:
            data, target = batch["data"], batch["target"]
            assert int(target.min()) == 0 and int(target.max()) == 2
            zero = data[:, 0] == 0
            assert zero.float().mean() > 0.05  # the outside of the brain (noise everywhere else in training)
            assert (target[:, 0][zero] == 0).all()  # only background was zeroed
    with pytest.raises(AutosegError, match="--force"):  # a plan that disagrees with the folder
        make_train_loader(LoaderSpec(**{**spec.__dict__, "masked_channels": ()}))


def test_device_augmentation_zeroes_the_masked_outside_like_the_cpu_path(masked) -> None:  # noqa: ANN001
    """augment.device=device: the same zeroing after the batch's intensity transforms, no -1 left."""
    _, plan, folder = masked
    config = plan.configuration("3d_fullres")
    cases = tuple(list_preprocessed_cases(folder))
    augment = AugmentConfig(device="device", p_noise=1.0, noise_std=(0.05, 0.1), p_rotation=0.5, p_scaling=0.5,
                            p_brightness=0.5, p_contrast=0.5)
    spec = LoaderSpec(data_dir=folder, case_ids=cases, config=config, batch_size=4, num_workers=0, seed=0,
                      deep_supervision=False, augment=augment, masked_channels=(0,))
    with make_train_loader(spec, "cpu") as train:
        for batch in [next(train) for _ in range(4)]:
            data, target = batch["data"], batch["target"]
            assert int(target.min()) == 0 and int(target.max()) == 2
            zero = data[:, 0] == 0
            assert zero.float().mean() > 0.05  # outside the brain: zeroed after the noise
            assert (zero == (target[:, 0] == 0)).float().mean() > 0.5  # zeros sit in the background
            assert (target[:, 0][zero] == 0).all()  # only background was zeroed


def test_restore_is_the_same_on_numpy_samples_and_torch_batches() -> None:
    rng = np.random.default_rng(3)
    data = rng.normal(size=(2, 3, 5, 6, 7)).astype(np.float32)
    seg = rng.integers(-1, 3, size=(2, 2, 5, 6, 7)).astype(np.int8)  # two label channels (the cascade's)
    t_data, t_seg = restore_masked_background(torch.from_numpy(data.copy()), torch.from_numpy(seg.copy()), (0, 2),
                                              channel_axis=1)
    for b in range(2):
        n_data, n_seg = restore_masked_background(data[b].copy(), seg[b].copy(), (0, 2))
        np.testing.assert_array_equal(t_data[b].numpy(), n_data)
        np.testing.assert_array_equal(t_seg[b].numpy(), n_seg)
        outside = seg[b, 0] == -1
        assert (n_data[[0, 2]][:, outside] == 0).all()
        np.testing.assert_array_equal(n_data[[0, 2]][:, ~outside], data[b][[0, 2]][:, ~outside])
        np.testing.assert_array_equal(n_data[1], data[b, 1])  # an unmasked channel is left alone
        np.testing.assert_array_equal(n_seg, np.maximum(seg[b], 0))


def test_images_without_a_nonzero_mask_are_unchanged(tmp_path: Path) -> None:
    paths, plan, folder = _preprocess(tmp_path, background=20.0)
    assert not plan.normalization[0].use_nonzero_mask
    assert load_record(folder / SETTINGS_FILENAME, PreprocessingSettings).outside_mask_label is None
    assert all(load_preprocessed_case(folder, c).seg.min() == 0 for c in list_preprocessed_cases(folder))
    data = np.random.default_rng(0).normal(size=(1, 4, 5, 6)).astype(np.float32)
    seg = np.full((1, 4, 5, 6), -1, np.int8)  # all patch padding
    out_d, out_s = restore_masked_background(data.copy(), seg, ())
    np.testing.assert_array_equal(out_d, data)
    assert (out_s == 0).all()


def test_a_folder_preprocessed_before_the_marking_is_refused(masked, tmp_path: Path) -> None:  # noqa: ANN001
    paths, plan, folder = masked
    root = Paths.under(tmp_path)
    shutil.copytree(paths.raw, root.raw)
    shutil.copytree(paths.preprocessed_dataset(DATASET), root.preprocessed_dataset(DATASET))
    stale = root.preprocessed_data(DATASET, "3d_fullres")
    record = json.loads((stale / SETTINGS_FILENAME).read_text())
    del record["outside_mask_label"]
    (stale / SETTINGS_FILENAME).write_text(json.dumps({**record, "schema_version": 1}))  # as autoseg wrote it before
    config = plan.configuration("3d_fullres")
    spec = LoaderSpec(data_dir=stale, case_ids=tuple(list_preprocessed_cases(stale)), config=config,
                      augment=AugmentConfig(), batch_size=2, num_workers=0, seed=0, deep_supervision=False,
                      masked_channels=(0,))
    with pytest.raises(AutosegError, match="preprocess --force"):
        make_train_loader(spec)
    with pytest.raises(AutosegError, match="do not mark.*--force"):
        preprocess_dataset(root, DATASET, ["3d_fullres"], plan=plan)
    preprocess_dataset(root, DATASET, ["3d_fullres"], plan=plan, force=True)
    assert load_record(stale / SETTINGS_FILENAME, PreprocessingSettings).outside_mask_label == -1
    with make_train_loader(spec) as train:
        assert int(next(train)["target"].min()) == 0
