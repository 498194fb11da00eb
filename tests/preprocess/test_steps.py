"""The preprocessing steps on tiny synthetic cases: crop, normalize, resample, foreground sampling."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.common.errors import AutosegError
from autoseg.planning.plans import ChannelNormalization
from autoseg.preprocess import (FG_SAMPLES_PER_CLASS, crop_to_nonzero, normalize, preprocess_case, resample_data,
                                resample_seg, sample_foreground, separate_axis)
from tests.preprocess.conftest import blob_case, make_config, make_plan


def test_crop_box_is_the_nonzero_region_in_original_coordinates() -> None:
    data, seg, geom = blob_case(shape=(10, 24, 20), pad=2)
    _, _, props, _ = preprocess_case(data, geom, seg, make_plan([make_config("3d", (1.0, 1.0, 1.0))]),
                                     make_config("3d", (1.0, 1.0, 1.0)))
    assert props.bbox == ((2, 8), (2, 22), (2, 18))
    assert props.shape_before_crop == (10, 24, 20)
    assert props.shape_after_crop == (6, 20, 16)
    assert props.shape_after_resampling == (6, 20, 16)
    assert props.separate_z_axis is None


def test_all_zero_image_keeps_its_full_extent() -> None:
    bbox, mask = crop_to_nonzero(np.zeros((1, 3, 4, 5), np.float32))
    assert bbox == ((0, 3), (0, 4), (0, 5))
    assert mask.shape == (3, 4, 5)


def test_resampled_shape_matches_target_spacing() -> None:
    data, seg, geom = blob_case(shape=(10, 24, 20), spacing=(1.0, 1.0, 1.0), pad=2)
    config = make_config("3d", (0.5, 2.0, 1.5))
    out, out_seg, props, _ = preprocess_case(data, geom, seg, make_plan([config]), config)
    expected = (12, 10, 11)  # cropped (6, 20, 16) * (1/0.5, 1/2, 1/1.5), rounded
    assert out.shape == (1, *expected) and out.dtype == np.float32
    assert out_seg is not None and out_seg.shape == (1, *expected) and out_seg.dtype == np.int8
    assert props.shape_after_resampling == expected
    assert props.spacing_after_resampling == (0.5, 2.0, 1.5)


def test_resampled_labels_are_only_declared_labels_and_never_invented() -> None:
    seg = np.zeros((8, 16, 16), np.int16)
    seg[:, 4:12, 4:12] = 2  # 0 next to 2: a spline on label values would create 1s at the border
    out = resample_seg(seg, (11, 23, 21), labels=[0, 1, 2], order=1, axis=None)
    assert set(np.unique(out).tolist()) == {0, 2}
    data, full_seg, geom = blob_case()
    config = make_config("3d", (0.7, 1.3, 0.9))
    _, out_seg, props, _ = preprocess_case(data, geom, full_seg, make_plan([config]), config)
    assert set(np.unique(out_seg).tolist()) <= {0, 1, 2}
    assert props.classes_present == (0, 1, 2)


def test_undeclared_label_is_an_error() -> None:
    data, seg, geom = blob_case()
    seg[5, 10, 10] = 7
    config = make_config("3d", (1.0, 1.0, 1.0))
    with pytest.raises(AutosegError, match=r"\[7\]"):
        preprocess_case(data, geom, seg, make_plan([config]), config, case_id="c1")


@pytest.mark.parametrize("current, new, expected", [
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), None),
    ((3.5, 1.0, 1.0), (1.0, 1.0, 1.0), 0),   # the current spacing is anisotropic: its coarse axis
    ((1.0, 1.0, 1.0), (1.0, 1.0, 4.0), 2),   # else the new one's
    ((1.0, 3.5, 3.5), (1.0, 3.5, 3.5), None),  # two coarse axes: no single out-of-plane axis (nnU-Net)
    ((3.0, 1.0, 1.0), (3.0, 1.0, 1.0), None),  # ratio 3 is not > 3
])
def test_separate_axis_rule(current: tuple, new: tuple, expected: int | None) -> None:
    assert separate_axis(current, new) == expected


def test_anisotropic_case_is_resampled_out_of_plane_by_nearest_neighbour() -> None:
    data, seg, geom = blob_case(shape=(6, 20, 20), spacing=(4.0, 1.0, 1.0), pad=1)
    config = make_config("3d", (2.0, 0.8, 0.8))
    out, out_seg, props, _ = preprocess_case(data, geom, seg, make_plan([config]), config)
    assert props.separate_z_axis == 0
    assert out.shape[1] == 8  # 4 cropped slices * 4 / 2
    # nearest along z with a factor 2: every source slice appears twice, unblended
    assert np.array_equal(out[:, 0::2], out[:, 1::2])
    assert np.array_equal(out_seg[:, 0::2], out_seg[:, 1::2])
    # and the in-plane part is a real (cubic) resampling, not a copy
    assert out.shape[2:] == (22, 22)
    # the isotropic path (one 3D spline) blends neighbouring slices instead
    blended = resample_data(out[:, ::2], out.shape[1:], order=3, axis=None)
    assert not np.array_equal(blended[:, 0::2], blended[:, 1::2])


def test_2d_configuration_keeps_each_case_own_slice_spacing() -> None:
    data, seg, geom = blob_case(shape=(7, 24, 20), spacing=(2.5, 1.0, 1.0), pad=1)
    config = make_config("2d", (0.5, 2.0))
    out, _, props, _ = preprocess_case(data, geom, seg, make_plan([config]), config)
    assert props.spacing_after_resampling == (2.5, 0.5, 2.0)
    assert out.shape == (1, 5, 44, 9)


def test_transpose_puts_axes_in_plan_order() -> None:
    data, seg, geom = blob_case(shape=(10, 24, 20), spacing=(1.0, 2.0, 3.0), pad=2)
    config = make_config("3d", (3.0, 1.0, 2.0))  # transposed order: x, z, y
    out, out_seg, props, _ = preprocess_case(data, geom, seg, make_plan([config], transpose=(2, 0, 1)), config)
    assert props.shape_after_crop == (6, 20, 16)
    assert props.shape_after_resampling == (16, 6, 20)
    assert out.shape == (1, 16, 6, 20) and out_seg.shape == (1, 16, 6, 20)
    assert np.array_equal(out_seg[0], np.transpose(seg[2:8, 2:22, 2:18], (2, 0, 1)))


def test_zscore_with_nonzero_mask_leaves_the_outside_at_zero() -> None:
    data = np.zeros((1, 6, 8, 8), np.float32)
    data[0, 1:5, 2:7, 2:7] = np.random.default_rng(0).normal(300, 40, (4, 5, 5))
    data[0, 0, 0, 0] = 5.0  # a lone nonzero voxel: inside the crop box but outside the filled mask's body
    mask = np.any(data != 0, axis=0)
    out = normalize(data.copy(), mask, [ChannelNormalization("zscore", use_nonzero_mask=True)])
    assert np.all(out[0][~mask] == 0)
    assert abs(out[0][mask].mean()) < 1e-5 and abs(out[0][mask].std() - 1) < 1e-4
    whole = normalize(data.copy(), mask, [ChannelNormalization("zscore")])
    assert abs(whole.mean()) < 1e-5 and whole[0][~mask].min() < 0


def test_ct_and_rescale_normalization() -> None:
    x = np.array([[[[-2000.0, 0.0, 100.0, 5000.0]]]], np.float32)
    mask = np.ones(x.shape[1:], bool)
    ct = normalize(x.copy(), mask, [ChannelNormalization("ct", clip_low=-1000, clip_high=1000, mean=100, std=50)])
    np.testing.assert_allclose(ct[0, 0, 0], [(-1000 - 100) / 50, -2.0, 0.0, (1000 - 100) / 50])
    rescaled = normalize(x.copy(), mask, [ChannelNormalization("rescale_to_0_1")])
    assert rescaled.min() == 0.0 and rescaled.max() == 1.0
    with pytest.raises(AutosegError, match="needs clip_low"):
        normalize(x.copy(), mask, [ChannelNormalization("ct")])


def test_foreground_sampling_counts_coordinates_and_seed() -> None:
    seg = np.zeros((30, 40, 40), np.int8)
    seg[:, :20, :] = 1                 # 24,000 voxels: capped at 10,000
    seg[5:10, 30:35, 30:35] = 2        # 125 voxels: all of them
    fg = sample_foreground(seg, [1, 2, 3], np.random.default_rng(3))
    assert fg[1].shape == (FG_SAMPLES_PER_CLASS, 3) and fg[2].shape == (125, 3) and fg[3].shape == (0, 3)
    for c in (1, 2):
        assert np.all(seg[tuple(fg[c].T)] == c)
    again = sample_foreground(seg, [1, 2, 3], np.random.default_rng(3))
    assert np.array_equal(fg[1], again[1])


def test_inference_case_without_label() -> None:
    data, _, geom = blob_case()
    config = make_config("3d", (1.0, 1.5, 1.5))
    out, out_seg, props, fg = preprocess_case(data, geom, None, make_plan([config]), config)
    assert out_seg is None and fg == {} and props.classes_present == ()
    assert out.shape[1:] == props.shape_after_resampling


@pytest.mark.parametrize("axis", [0, 2])
def test_separate_in_plane_resampling_equals_resizing_each_slice(axis: int) -> None:
    from skimage.transform import resize

    volume = np.random.default_rng(0).normal(size=(5, 20, 17)).astype(np.float32)
    volume = np.moveaxis(volume, 0, axis)
    new_shape = list(volume.shape)
    for a in range(3):
        if a != axis:
            new_shape[a] = {20: 31, 17: 9}[volume.shape[a]]
    slices = [resize(np.take(volume, i, axis=axis), [n for a, n in enumerate(new_shape) if a != axis], order=3,
                     mode="edge", anti_aliasing=False) for i in range(volume.shape[axis])]
    out = resample_data(volume[None], tuple(new_shape), order=3, axis=axis)[0]
    np.testing.assert_allclose(out, np.stack(slices, axis=axis), rtol=0, atol=1e-6)
