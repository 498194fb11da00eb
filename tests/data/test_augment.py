"""Augmentation: nnU-Net defaults, per-configuration setup, sample-then-apply determinism, each transform."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from autoseg.common.errors import ConfigError
from autoseg.data.augment import (
    AugmentConfig,
    AugParams,
    augmentation_setup,
    crop_only_setup,
    initial_patch_size,
    sample_params,
    training_mirror_axes,
)
from autoseg.data.augment_cpu import apply_augmentation, center_crop, downsample_seg_for_ds
from tests.data.conftest import CONFIG_2D, CONFIG_3D, CONFIG_3D_ANISO, make_config


def _sample(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(2,) + shape).astype(np.float32)
    seg = np.zeros((1,) + shape, dtype=np.int8)
    seg[(0,) + tuple(slice(s // 4, s // 2) for s in shape)] = 1
    return data, seg


def test_defaults_are_nnunet_v2s() -> None:
    cfg = AugmentConfig()
    assert (cfg.p_rotation, cfg.p_scaling, cfg.scale_range) == (0.2, 0.2, (0.7, 1.4))
    assert (cfg.rotation_deg_3d, cfg.rotation_deg_2d) == (30.0, 180.0)
    assert (cfg.p_noise, cfg.p_blur, cfg.p_brightness, cfg.p_contrast, cfg.p_lowres) == (0.1, 0.2, 0.15, 0.15, 0.25)
    assert (cfg.p_gamma, cfg.p_gamma_inverted, cfg.gamma_range) == (0.3, 0.1, (0.7, 1.5))


def test_bad_values_are_config_errors_naming_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(AugmentConfig(), p_rotation=1.5)
    assert e.value.where == "augment.p_rotation"
    with pytest.raises(ConfigError) as e:
        AugmentConfig(scale_range=(1.4, 0.7))
    assert e.value.where == "augment.scale_range"


def test_setup_for_isotropic_3d_enlarges_every_axis() -> None:
    setup = augmentation_setup(CONFIG_3D, AugmentConfig())
    assert not setup.dummy_2d and setup.rotation_max_rad == pytest.approx((math.radians(30),) * 3)
    assert all(i > p for i, p in zip(setup.initial_patch_size, setup.patch_size))
    assert setup.mirror_axes == (0, 1, 2) and setup.lowres_ignore_axes == ()


def test_anisotropic_3d_uses_dummy_2d_and_still_mirrors_every_axis() -> None:
    aniso = make_config((8, 64, 64), ((1, 1, 1), (1, 2, 2), (2, 2, 2)))
    setup = augmentation_setup(aniso, AugmentConfig())
    assert setup.dummy_2d and setup.rotation_max_rad == pytest.approx((math.pi,))
    assert setup.initial_patch_size[0] == 8 and setup.initial_patch_size[1] > 64
    assert setup.lowres_ignore_axes == (0,)
    assert training_mirror_axes(aniso, AugmentConfig()) == (0, 1, 2)
    assert training_mirror_axes(aniso, AugmentConfig(mirror=False)) == ()
    assert not augmentation_setup(aniso, AugmentConfig(dummy_2d=False)).dummy_2d
    assert training_mirror_axes(CONFIG_2D, AugmentConfig()) == (0, 1)


def test_initial_patch_covers_the_rotated_and_scaled_patch() -> None:
    # a 40x40 square rotated by up to 180 deg needs its diagonal (56.57), / 0.85 for scaling = 66.55,
    # rounded up to 67, then to 68 for an even margin
    assert initial_patch_size((40, 40), (math.pi,), False, True) == (68, 68)
    assert initial_patch_size((40, 40), (0.0,), False, False) == (40, 40)
    elongated = augmentation_setup(make_config((16, 48), ((1, 1), (2, 2))), AugmentConfig())
    assert elongated.rotation_max_rad == pytest.approx((math.radians(15),))
    off = augmentation_setup(CONFIG_3D, AugmentConfig(rotation=False, scaling=False))
    assert off.initial_patch_size == off.patch_size


def test_disabled_config_only_crops() -> None:
    setup = augmentation_setup(CONFIG_3D, AugmentConfig.disabled())
    assert setup.initial_patch_size == setup.patch_size
    data, seg = _sample((10, 20, 20))
    params = sample_params(np.random.default_rng(0), setup, 2)
    assert params == AugParams()
    out_d, out_s = apply_augmentation(data, seg, params, setup)
    np.testing.assert_array_equal(out_d, center_crop(data, setup.patch_size))
    np.testing.assert_array_equal(out_s, center_crop(seg, setup.patch_size))
    assert crop_only_setup(CONFIG_3D) == setup


def test_same_seed_same_params_and_output() -> None:
    setup = augmentation_setup(CONFIG_3D, AugmentConfig(p_rotation=1.0, p_noise=1.0, p_lowres=1.0))
    data, seg = _sample(setup.initial_patch_size)
    p1 = [sample_params(np.random.default_rng(5), setup, 2) for _ in range(2)]
    assert p1[0] == p1[1] and p1[0].rotation_rad is not None
    a = apply_augmentation(data.copy(), seg.copy(), p1[0], setup)
    b = apply_augmentation(data.copy(), seg.copy(), p1[1], setup)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert sample_params(np.random.default_rng(6), setup, 2) != p1[0]


def test_quarter_turn_in_2d_is_rot90() -> None:
    setup = augmentation_setup(make_config((12, 12), ((1, 1), (2, 2))), AugmentConfig(scaling=False))
    data, seg = _sample(setup.initial_patch_size)
    out_d, out_s = apply_augmentation(data, seg, AugParams(rotation_rad=(math.pi / 2,)), setup)
    crop_d, crop_s = center_crop(data, setup.patch_size), center_crop(seg, setup.patch_size)
    k = 1 if np.allclose(out_d, np.rot90(crop_d, 1, axes=(1, 2)), atol=1e-4) else -1
    np.testing.assert_allclose(out_d, np.rot90(crop_d, k, axes=(1, 2)), atol=1e-4)
    np.testing.assert_array_equal(out_s, np.rot90(crop_s, k, axes=(1, 2)))


def test_dummy_2d_rotation_leaves_axis_0_alone() -> None:
    setup = augmentation_setup(CONFIG_3D_ANISO, AugmentConfig(scaling=False))
    data, seg = _sample(setup.initial_patch_size)
    data[:, 2] = 0.0  # one blank slice stays blank after in-plane rotation
    out_d, _ = apply_augmentation(data, seg, AugParams(rotation_rad=(0.7,)), setup)
    assert out_d.shape == (2,) + CONFIG_3D_ANISO.patch_size
    z0 = (setup.initial_patch_size[0] - setup.patch_size[0]) // 2
    assert np.abs(out_d[:, 2 - z0]).max() == 0 and np.abs(out_d).max() > 0


def test_mirroring_flips_data_and_labels_together() -> None:
    setup = augmentation_setup(CONFIG_3D, AugmentConfig.disabled())
    data, seg = _sample(setup.patch_size)
    out_d, out_s = apply_augmentation(data, seg, AugParams(mirror_axes=(0, 2)), setup)
    np.testing.assert_array_equal(out_d, data[:, ::-1, :, ::-1])
    np.testing.assert_array_equal(out_s, seg[:, ::-1, :, ::-1])


@pytest.mark.parametrize("params", [
    AugParams(noise_std=0.1, noise_seed=3), AugParams(blur_sigma=(1.0, None)), AugParams(brightness=(1.2, 0.8)),
    AugParams(contrast=(1.25, 0.75)), AugParams(lowres_zoom=(0.5, None)), AugParams(gamma=(1.5, 0.7)),
    AugParams(gamma_inverted=(0.7, 1.4)), AugParams(scale=1.3),
], ids=["noise", "blur", "brightness", "contrast", "lowres", "gamma", "gamma_inverted", "scale"])
def test_each_intensity_transform_changes_the_image_only(params: AugParams) -> None:
    setup = augmentation_setup(CONFIG_3D, AugmentConfig())
    data, seg = _sample(setup.initial_patch_size)
    plain_d, plain_s = apply_augmentation(data.copy(), seg.copy(), AugParams(), setup)
    out_d, out_s = apply_augmentation(data.copy(), seg.copy(), params, setup)
    assert out_d.shape == plain_d.shape and out_d.dtype == np.float32 and np.isfinite(out_d).all()
    assert not np.allclose(out_d[0], plain_d[0])
    if params.scale is None:
        np.testing.assert_array_equal(out_s, plain_s)
    if params.gamma is not None:  # retain_stats: mean and std per channel are kept
        assert out_d[0].mean() == pytest.approx(plain_d[0].mean(), abs=1e-4)
        assert out_d[0].std() == pytest.approx(plain_d[0].std(), rel=1e-3)
    if params.blur_sigma or params.lowres_zoom:
        np.testing.assert_array_equal(out_d[1], plain_d[1])  # channel skipped


def test_deep_supervision_targets_are_nearest_downsampled() -> None:
    seg = np.random.default_rng(0).integers(0, 3, size=(2, 1, 8, 16, 16)).astype(np.int64)
    out = downsample_seg_for_ds(seg, [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (0.5, 0.25, 0.25)])
    assert [o.shape for o in out] == [(2, 1, 8, 16, 16), (2, 1, 8, 8, 8), (2, 1, 4, 4, 4)]
    assert out[0] is seg
    np.testing.assert_array_equal(out[1], seg[:, :, :, 1::2, 1::2])
    assert set(np.unique(out[2])) <= {0, 1, 2}


def test_a_switched_on_transform_that_never_fires_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="autoseg.data.augment"):
        augmentation_setup(CONFIG_3D, AugmentConfig(p_noise=0.0))
        augmentation_setup(CONFIG_3D, AugmentConfig(noise=False, p_noise=0.0))
    assert [r.getMessage().split(" ")[0] for r in caplog.records] == ["augment.noise"]
