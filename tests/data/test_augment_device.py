"""Batched device augmentation: each transform agrees with the CPU path `apply_augmentation` on the same params."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from autoseg.data.augment import (
    AugmentConfig,
    AugmentSetup,
    AugParams,
    augmentation_setup,
    sample_params,
)
from autoseg.data.augment_cpu import apply_augmentation, center_crop, downsample_seg_for_ds
from autoseg.data.augment_device import augment_batch, deep_supervision_targets
from autoseg.data.cascade import (
    MORPHOLOGY_OPERATIONS,
    CascadeDegradation,
    apply_degradation,
    one_hot_foreground,
    sample_degradation,
)
from autoseg.data.cascade_device import _components, _degrade_on_device, degrade_one_hot
from autoseg.nets.unet import deep_supervision_scales
from tests.data.conftest import make_config
from tests.helpers import HIPPOCAMPUS_MISSING, HIPPOCAMPUS_MSD, hippocampus_available, hippocampus_case_ids

CONFIG = make_config((12, 16, 20), ((1, 1, 1), (2, 2, 2), (2, 2, 2)))
CONFIG_DUMMY_2D = make_config((4, 20, 24), ((1, 1, 1), (1, 2, 2), (1, 2, 2)))
CONFIG_2D = make_config((20, 24), ((1, 1), (2, 2)))

ROTATIONS = [AugParams(rotation_rad=(0.3, -0.2, 0.4)), AugParams(scale=0.8), AugParams(scale=1.3),
             AugParams(rotation_rad=(-0.4, 0.5, -0.3), scale=1.15)]


def _setup(config=CONFIG, **augment) -> AugmentSetup:
    return augmentation_setup(config, AugmentConfig(**augment))


def _blob(shape: tuple[int, ...], channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A smooth anisotropic Gaussian blob (C, *shape) and its nested labels 0/1/2 (1, *shape)."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    centre = np.array([(s - 1) / 2 for s in shape]).reshape((-1,) + (1,) * len(shape))
    width = np.array([5.0, 7.0, 6.0][-len(shape):]).reshape((-1,) + (1,) * len(shape))
    r2 = (((grid - centre + 0.7) / width) ** 2).sum(0)
    data = np.stack([np.exp(-0.5 * r2) * (c + 1) for c in range(channels)]).astype(np.float32)
    seg = ((r2 < 1.5).astype(np.int8) + (r2 < 0.4))[None]
    return data, seg


def _random(shape: tuple[int, ...], channels: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(channels,) + shape).astype(np.float32),
            rng.integers(0, 3, size=(1,) + shape).astype(np.int8))


def _device(data: np.ndarray, seg: np.ndarray, params: list[AugParams], setup: AugmentSetup,
            ) -> tuple[np.ndarray, np.ndarray]:
    """augment_batch on a batch of copies of one sample (one params record each); numpy out."""
    d = torch.from_numpy(np.stack([data] * len(params)))
    s = torch.from_numpy(np.stack([seg] * len(params)))
    out_d, out_s = augment_batch(d, s, params, setup)
    assert out_d.dtype == torch.float32 and out_s.dtype == s.dtype
    assert tuple(out_d.shape[2:]) == tuple(out_s.shape[2:]) == setup.patch_size
    return out_d.numpy(), out_s.numpy()


def _interior(ndim: int, margin: int = 2) -> tuple[slice, ...]:
    return (slice(None),) + (slice(margin, -margin),) * ndim


def test_noop_params_are_the_exact_centre_crop() -> None:
    setup = _setup()
    data, seg = _random(setup.initial_patch_size)
    out_d, out_s = _device(data, seg, [AugParams()] * 2, setup)
    for k in range(2):
        np.testing.assert_allclose(out_d[k], center_crop(data, setup.patch_size), rtol=0, atol=1e-7)
        np.testing.assert_array_equal(out_s[k], center_crop(seg, setup.patch_size))


def test_inputs_are_not_modified() -> None:
    setup = _setup()
    data, seg = _random(setup.initial_patch_size)
    d, s = torch.from_numpy(np.stack([data])), torch.from_numpy(np.stack([seg]))
    augment_batch(d, s, [AugParams(rotation_rad=(0.2, 0.1, 0.0), gamma=(1.2, 0.8), mirror_axes=(1,))], setup)
    np.testing.assert_array_equal(d[0].numpy(), data)
    np.testing.assert_array_equal(s[0].numpy(), seg)


@pytest.mark.parametrize("axes", [(0,), (1, 2), (0, 1, 2)])
def test_flips_equal_the_cpu_path(axes: tuple[int, ...]) -> None:
    setup = _setup()
    data, seg = _random(setup.initial_patch_size)
    params = AugParams(mirror_axes=axes)
    out_d, out_s = _device(data, seg, [params, AugParams()], setup)
    cpu_d, cpu_s = apply_augmentation(data, seg, params, setup)
    np.testing.assert_array_equal(out_d[0], cpu_d)
    np.testing.assert_array_equal(out_s[0], cpu_s)
    np.testing.assert_array_equal(out_s[1], center_crop(seg, setup.patch_size))  # the other sample is not flipped


def test_gamma_brightness_contrast_blur_equal_the_cpu_path() -> None:
    setup = _setup()
    data, seg = _random(setup.initial_patch_size)
    data = data * np.array([1.0, 3.0], np.float32).reshape(2, 1, 1, 1) + 0.5
    records = [AugParams(gamma=(1.3, 0.8)), AugParams(gamma_inverted=(0.75, 1.4)),
               AugParams(gamma_inverted=(1.2, 1.1), gamma=(0.9, 1.45)), AugParams(brightness=(0.8, 1.2)),
               AugParams(contrast=(1.25, 0.8)), AugParams(blur_sigma=(0.6, None)),
               AugParams(blur_sigma=(1.0, 0.5)), AugParams(blur_sigma=(None, 0.8), contrast=(1.1, 0.9)), AugParams()]
    out_d, _ = _device(data, seg, records, setup)  # all in one batch: the per-sample selection must hold
    for k, params in enumerate(records):
        cpu_d, _ = apply_augmentation(data, seg, params, setup)
        np.testing.assert_allclose(out_d[k], cpu_d, rtol=1e-5, atol=2e-5, err_msg=str(params))


@pytest.mark.parametrize("params", ROTATIONS)
def test_rotation_and_scaling_agree_with_the_cpu_path_within_interpolation_error(params: AugParams) -> None:
    setup = _setup()
    data, seg = _blob(setup.initial_patch_size)
    out_d, out_s = _device(data, seg, [params], setup)
    cpu_d, cpu_s = apply_augmentation(data, seg, params, setup)
    # linear (device) vs cubic (CPU) on a blob of peak 1 and width >= 5 voxels
    assert np.abs(out_d[0] - cpu_d)[_interior(3)].max() < 0.02
    assert not np.allclose(out_d[0], center_crop(data, setup.patch_size), atol=0.05)  # it did move
    assert np.mean(out_s[0] != cpu_s) < 0.02  # labels differ only on a few boundary voxels
    assert set(np.unique(out_s[0])) == {0, 1, 2}


def test_rotated_samples_of_one_batch_equal_those_rotated_alone() -> None:
    """Each sample is resampled from its own box inside the batch's common box: its neighbours never change it."""
    setup = _setup()
    rng = np.random.default_rng(1)
    samples = [(rng.normal(size=(1,) + setup.initial_patch_size).astype(np.float32) + 3.0,
                rng.integers(0, 3, size=(1,) + setup.initial_patch_size).astype(np.int8)) for _ in ROTATIONS]
    batch_d, batch_s = augment_batch(torch.from_numpy(np.stack([d for d, _ in samples])),
                                     torch.from_numpy(np.stack([s for _, s in samples])), ROTATIONS, setup)
    for k, (params, (data, seg)) in enumerate(zip(ROTATIONS, samples)):
        alone_d, alone_s = _device(data, seg, [params], setup)
        np.testing.assert_allclose(batch_d[k].numpy(), alone_d[0], rtol=0, atol=1e-4)  # float32 grid rounding
        assert np.mean(batch_s[k].numpy() != alone_s[0]) < 0.01  # random labels: exact ties flip with the rounding


def test_dummy_2d_rotates_in_plane_only() -> None:
    setup = _setup(CONFIG_DUMMY_2D)
    assert setup.dummy_2d
    shape = setup.initial_patch_size
    data = np.broadcast_to(np.arange(1, shape[0] + 1, dtype=np.float32).reshape(-1, 1, 1), shape)[None].copy()
    seg = np.broadcast_to((np.arange(shape[0]) % 2).astype(np.int8).reshape(-1, 1, 1), shape)[None].copy()
    params = AugParams(rotation_rad=(0.9,), scale=1.1)
    out_d, out_s = _device(data, seg, [params], setup)
    for k in range(setup.patch_size[0]):  # output slice k holds input slice k's value only
        np.testing.assert_allclose(out_d[0, 0, k][2:-2, 2:-2], k + 1, rtol=1e-6)
        assert set(np.unique(out_s[0, 0, k])) == {k % 2}
    blob, blob_seg = _blob(shape)
    out_d, out_s = _device(blob, blob_seg, [params], setup)
    cpu_d, cpu_s = apply_augmentation(blob, blob_seg, params, setup)
    assert np.abs(out_d[0] - cpu_d)[(slice(None), slice(None), slice(2, -2), slice(2, -2))].max() < 0.02
    assert np.mean(out_s[0] != cpu_s) < 0.02


def test_2d_rotation_agrees_with_the_cpu_path() -> None:
    setup = _setup(CONFIG_2D)
    data, seg = _blob(setup.initial_patch_size, channels=2)
    params = AugParams(rotation_rad=(2.0,), scale=0.9)
    out_d, out_s = _device(data, seg, [params], setup)
    cpu_d, cpu_s = apply_augmentation(data, seg, params, setup)
    assert np.abs(out_d[0] - cpu_d)[_interior(2)].max() < 0.04  # channel 1 peaks at 2
    assert np.mean(out_s[0] != cpu_s) < 0.02


@pytest.mark.parametrize("ignore, dtype", [(7, np.int16), (200, np.int16), (-1, np.int8)])
def test_labels_stay_input_labels_and_the_ignore_label_survives_rotation(ignore: int, dtype: type) -> None:
    setup = _setup()
    shape = setup.initial_patch_size
    rng = np.random.default_rng(3)
    data = rng.normal(size=(1,) + shape).astype(np.float32)
    seg = np.zeros((1,) + shape, dtype)
    seg[0, :, :, : shape[2] // 3] = 2
    seg[0, 4:-4, 5:-5, shape[2] // 3: 2 * shape[2] // 3] = ignore  # the ignore label of sparse annotations
    seg[0, rng.random(shape) < 0.05] = 1  # speckles: many three-label neighbourhoods
    records = [sample_params(rng, _setup(p_rotation=1.0, p_scaling=1.0), 1) for _ in range(6)]
    _, out_s = _device(data, seg, records, setup)
    assert set(np.unique(out_s)) <= {0, 1, 2, ignore}
    for k, params in enumerate(records):
        ignored = np.mean(out_s[k] == ignore)
        expected = np.mean(center_crop(seg, setup.patch_size) == ignore)
        assert ignored == pytest.approx(expected, rel=0.6), params  # rotated and zoomed, but still there


def test_a_batch_without_foreground_stays_background() -> None:
    setup = _setup()
    data, _ = _random(setup.initial_patch_size, channels=1)
    seg = np.zeros((1,) + setup.initial_patch_size, np.int8)
    out_d, out_s = _device(data, seg, ROTATIONS, setup)
    assert not out_s.any()
    assert np.isfinite(out_d).all() and np.abs(out_d).max() <= np.abs(data).max()  # linear: no overshoot


def test_outside_the_initial_patch_is_zero() -> None:
    setup = _setup()
    data, _ = _random(setup.initial_patch_size, channels=1)
    data = np.abs(data) + 1.0
    seg = np.full((1,) + setup.initial_patch_size, 3, np.int8)  # no background in the input at all
    params = AugParams(rotation_rad=(0.0, 0.0, 0.0), scale=2.5)  # zoomed out far beyond the initial patch
    out_d, out_s = _device(data, seg, [params], setup)
    corner = (0, 0, 0, 0)
    centre = (0,) + tuple(p // 2 for p in setup.patch_size)
    assert out_d[0][corner] == 0.0 and out_s[0][corner] == 0
    assert out_d[0][centre] >= 1.0 and out_s[0][centre] == 3


def test_deep_supervision_targets_equal_the_cpu_path() -> None:
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 4, size=(3, 1, 12, 16, 20)).astype(np.int64)
    scales = deep_supervision_scales(CONFIG) + [(1.0, 1.0, 1.0), (0.5, 0.3, 0.7), (0.1, 0.1, 0.1)]
    expected = downsample_seg_for_ds(seg, scales)
    got = deep_supervision_targets(torch.from_numpy(seg), scales)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g.numpy(), e)


def test_same_params_give_the_same_batch() -> None:
    setup = _setup(p_rotation=0.5, p_scaling=0.5, p_noise=0.5, p_blur=0.5, p_lowres=0.5)
    data, seg = _random(setup.initial_patch_size)
    rng = np.random.default_rng(7)
    records = [sample_params(rng, setup, 2) for _ in range(8)]
    first = _device(data, seg, records, setup)
    second = _device(data, seg, records, setup)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    # and a sample's output does not depend on its batch neighbours
    alone = _device(data, seg, records[3:4], setup)
    np.testing.assert_allclose(alone[0][0], first[0][3], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(alone[1][0], first[1][3])


def test_noise_has_the_drawn_std_and_its_seed_reproduces_it() -> None:
    setup = _setup()
    data = np.zeros((1,) + setup.initial_patch_size, np.float32)
    seg = np.zeros((1,) + setup.initial_patch_size, np.int8)
    records = [AugParams(noise_std=0.05 + 0.01 * k, noise_seed=100 + k) for k in range(6)] + [AugParams()]
    out_d, _ = _device(data, seg, records, setup)
    for k in range(6):
        noise = out_d[k]
        assert abs(noise.mean()) < 0.1 * records[k].noise_std  # 9 standard errors of the mean
        assert noise.std() == pytest.approx(records[k].noise_std, rel=0.05)
    assert not out_d[6].any()
    assert not np.array_equal(out_d[0], out_d[1])
    again, _ = _device(data, seg, records[:1], setup)
    np.testing.assert_array_equal(again[0], out_d[0])
    cpu_d, _ = apply_augmentation(data, seg, records[2], setup)
    assert cpu_d.std() == pytest.approx(out_d[2].std(), rel=0.05)  # same distribution as the CPU path


def test_lowres_agrees_with_the_cpu_path_on_a_smooth_volume() -> None:
    for config in (CONFIG, CONFIG_DUMMY_2D, CONFIG_2D):
        setup = _setup(config)
        data, seg = _blob(setup.initial_patch_size)
        params = AugParams(lowres_zoom=(0.6,))
        out_d, _ = _device(data, seg, [params], setup)
        cpu_d, _ = apply_augmentation(data, seg, params, setup)
        crop = center_crop(data, setup.patch_size)
        assert np.abs(out_d[0] - cpu_d).max() < 0.08
        assert np.abs(out_d[0] - crop).max() > 0.01  # it did degrade


def test_lowres_in_dummy_2d_keeps_slices_apart() -> None:
    setup = _setup(CONFIG_DUMMY_2D)
    shape = setup.initial_patch_size
    data = np.broadcast_to(np.arange(shape[0], dtype=np.float32).reshape(-1, 1, 1) * 10, shape)[None].copy()
    out_d, _ = _device(data, np.zeros_like(data, np.int8), [AugParams(lowres_zoom=(0.5,))], setup)
    for k in range(shape[0]):
        np.testing.assert_allclose(out_d[0, 0, k], 10 * k, atol=1e-4)


def test_full_random_params_keep_statistics_close_to_the_cpu_path() -> None:
    """nnU-Net's defaults drawn for 24 samples: per-sample mean and std of both paths stay close."""
    setup = _setup()
    data, seg = _blob(setup.initial_patch_size, channels=2)
    rng = np.random.default_rng(11)
    records = [sample_params(rng, setup, 2) for _ in range(24)]
    out_d, out_s = _device(data, seg, records, setup)
    for k, params in enumerate(records):
        cpu_d, cpu_s = apply_augmentation(data, seg, params, setup)
        assert out_d[k].mean() == pytest.approx(cpu_d.mean(), abs=0.02), params
        assert out_d[k].std() == pytest.approx(cpu_d.std(), abs=0.03), params
        assert np.mean(out_s[k] != cpu_s) < 0.03, params


def test_cascade_batch_keeps_the_previous_stage_channel_labels() -> None:
    setup = _setup()
    data, seg = _blob(setup.initial_patch_size)
    previous = np.where(seg > 0, 3 - seg, 0).astype(np.int8)  # labels swapped: a distinct 2nd channel
    both = np.concatenate([seg, previous])
    params = [AugParams(rotation_rad=(0.3, 0.2, -0.1), scale=1.1, mirror_axes=(2,)), AugParams(mirror_axes=(0,))]
    out_d, out_s = _device(data, both, params, setup)
    assert out_s.shape[1] == 2
    for k in range(2):
        assert set(np.unique(out_s[k, 1])) == {0, 1, 2}
        # voxel by voxel the second channel is the first one's swap, so they moved together
        np.testing.assert_array_equal(out_s[k, 1], np.where(out_s[k, 0] > 0, 3 - out_s[k, 0], 0))
    one_hot = torch.from_numpy(np.stack([one_hot_foreground(out_s[k, 1], 3) for k in range(2)]))
    rng = np.random.default_rng(5)
    degradations = [sample_degradation(rng, 2) for _ in range(2)]
    while all(d.is_noop for d in degradations):
        degradations = [sample_degradation(rng, 2) for _ in range(2)]
    degraded = degrade_one_hot(one_hot, degradations)
    for k, degradation in enumerate(degradations):
        np.testing.assert_array_equal(degraded[k].numpy(), apply_degradation(one_hot[k].numpy(), degradation))


def _boxes(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int = 3, count: int = 6) -> np.ndarray:
    """A label map of a few random overlapping boxes: components of many sizes, touching borders."""
    seg = np.zeros(shape, np.int64)
    for _ in range(count):
        low = [int(rng.integers(0, s - 2)) for s in shape]
        seg[tuple(slice(a, a + int(rng.integers(1, 6))) for a in low)] = rng.integers(1, num_classes)
    return seg


def test_torch_degradation_equals_the_numpy_one() -> None:
    """The device path of degrade_one_hot (ball convolutions, label propagation) voxel for voxel."""
    rng = np.random.default_rng(0)
    for trial in range(24):
        shape = (10, 14, 16) if trial % 3 else (18, 20)
        one_hot = one_hot_foreground(_boxes(rng, shape), 3)
        operation = MORPHOLOGY_OPERATIONS[trial % 4]
        degradation = CascadeDegradation(morphology=((trial % 2, operation, float(rng.uniform(1, 8))),
                                                     (1 - trial % 2, operation, float(rng.uniform(1, 3)))),
                                         remove_component=((int(rng.integers(2)), float(rng.random())),))
        expected = apply_degradation(one_hot, degradation)
        assert not np.array_equal(expected, one_hot)
        np.testing.assert_array_equal(_degrade_on_device(torch.from_numpy(one_hot), degradation).numpy(), expected,
                                      err_msg=str(degradation))


def test_components_come_in_scipy_label_order() -> None:
    from scipy.ndimage import label

    rng = np.random.default_rng(1)
    for shape in ((9, 11, 13), (15, 17)):
        mask = rng.random(shape) < 0.35
        labels, count = label(mask)
        rep = _components(torch.from_numpy(mask)).numpy()
        starts = np.unique(rep[mask])
        assert len(starts) == count > 5
        np.testing.assert_array_equal(np.searchsorted(starts, rep[mask]) + 1, labels[mask])


@pytest.mark.skipif(not hippocampus_available(), reason=HIPPOCAMPUS_MISSING)
def test_real_hippocampus_patches_at_the_planned_shape_agree_with_the_cpu_path() -> None:
    """Real MRI and labels at 3d_fullres's patch (40, 56, 40): every transform drawn, both paths compared."""
    import SimpleITK as sitk

    setup = _setup(make_config((40, 56, 40), ((1, 1, 1), (2, 2, 2))), p_rotation=1.0, p_scaling=0.5,
                   p_blur=0.5, p_gamma=0.5, p_lowres=0.5)
    rng = np.random.default_rng(4)
    samples = []
    for case in hippocampus_case_ids(2):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS_MSD / "imagesTr" / f"{case}.nii.gz")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS_MSD / "labelsTr" / f"{case}.nii.gz")))
        data = np.zeros((1,) + setup.initial_patch_size, np.float32)  # the case, zero-padded around its centre
        seg = np.zeros((1,) + setup.initial_patch_size, np.int8)
        box = tuple(slice((i - s) // 2, (i - s) // 2 + s) for i, s in zip(setup.initial_patch_size, image.shape))
        data[(0,) + box] = (image - image.mean()) / image.std()
        seg[(0,) + box] = label
        samples.append((data, seg))
    records = [sample_params(rng, setup, 1) for _ in range(4)]
    batch = [samples[k % 2] for k in range(4)]
    out_d, out_s = augment_batch(torch.from_numpy(np.stack([d for d, _ in batch])),
                                 torch.from_numpy(np.stack([s for _, s in batch])), records, setup)
    for k, params in enumerate(records):
        cpu_d, cpu_s = apply_augmentation(*batch[k], params, setup)
        assert set(np.unique(out_s[k].numpy())) <= {0, 1, 2}
        assert out_d[k].mean().item() == pytest.approx(cpu_d.mean(), abs=0.05), params
        assert out_d[k].std().item() == pytest.approx(cpu_d.std(), rel=0.12), params  # linear smooths more than cubic
        foreground = (cpu_s > 0) | (out_s[k].numpy() > 0)
        if foreground.sum() > 100:  # hippocampus in view: the labels overlap voxel by voxel
            assert np.mean(out_s[k].numpy()[foreground] == cpu_s[foreground]) > 0.95, params


@pytest.mark.gpu
def test_cuda_batch_equals_the_cpu_batch() -> None:
    setup = _setup(p_rotation=0.5, p_scaling=0.5, p_noise=0.0, p_blur=0.5, p_lowres=0.5)
    data, seg = _blob(setup.initial_patch_size, channels=2)
    rng = np.random.default_rng(2)
    records = [sample_params(rng, setup, 2) for _ in range(8)]
    d, s = torch.from_numpy(np.stack([data] * 8)), torch.from_numpy(np.stack([seg] * 8))
    cpu_d, cpu_s = augment_batch(d, s, records, setup)
    gpu_d, gpu_s = augment_batch(d.cuda(), s.cuda(), records, setup)
    assert gpu_d.device.type == "cuda"
    np.testing.assert_allclose(gpu_d.cpu().numpy(), cpu_d.numpy(), atol=1e-3)
    assert (gpu_s.cpu() != cpu_s).float().mean() < 1e-3
    noisy = [dataclasses.replace(r, noise_std=0.1, noise_seed=4) for r in records[:2]]
    first, _ = augment_batch(d[:2].cuda(), s[:2].cuda(), noisy, setup)
    second, _ = augment_batch(d[:2].cuda(), s[:2].cuda(), noisy, setup)
    assert torch.equal(first, second)
    one_hot = torch.from_numpy(np.stack([one_hot_foreground(_boxes(rng, (10, 14, 16)), 3) for _ in range(4)]))
    degradations = [CascadeDegradation(morphology=((k % 2, MORPHOLOGY_OPERATIONS[k], 2.5 + k),),
                                       remove_component=((1 - k % 2, 0.3),)) for k in range(4)]
    np.testing.assert_array_equal(degrade_one_hot(one_hot.cuda(), degradations).cpu().numpy(),
                                  degrade_one_hot(one_hot, degradations).numpy())
    targets = deep_supervision_targets(gpu_s[:, :1].long(), deep_supervision_scales(CONFIG))
    expected = downsample_seg_for_ds(gpu_s[:, :1].long().cpu().numpy(), deep_supervision_scales(CONFIG))
    for t, e in zip(targets, expected):
        np.testing.assert_array_equal(t.cpu().numpy(), e)
