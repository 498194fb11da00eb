"""The numpy linear resampling of the CPU augmentation path against torch's grid_sample / interpolate,
the operations nnU-Net 2.8.1's transforms call (torch is a dependency of autoseg, so no skip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.functional import grid_sample, interpolate

from autoseg.data.interpolate import LinearSampler, simulate_low_resolution


def _random_points(rng: np.random.Generator, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                   margin: float) -> np.ndarray:
    """Points spread over the input, reaching ``margin`` voxels past its border."""
    return np.stack([rng.uniform(-margin, n - 1 + margin, size=out_shape) for n in in_shape])


def _grid_sample(x: np.ndarray, coords: np.ndarray, mode: str) -> np.ndarray:
    """torch grid_sample of (C, *in) at voxel coordinates (ndim, *out), zeros padding, align_corners=False."""
    spatial = x.shape[1:]
    # grid_sample wants (x, y[, z]) = last axis first, normalized so that -1/+1 are the outer voxel edges
    grid = np.stack([(2 * coords[d] + 1) / spatial[d] - 1 for d in reversed(range(len(spatial)))], -1)
    out = grid_sample(torch.from_numpy(x)[None].float(), torch.from_numpy(grid)[None].float(), mode=mode,
                      padding_mode="zeros", align_corners=False)
    return out[0].numpy()


@pytest.mark.parametrize("in_shape,margin", [((9, 11, 10), 0.0), ((9, 11, 10), 2.0), ((13, 12), 1.5)],
                         ids=["3d_inside", "3d_outside", "2d_outside"])
def test_images_equal_torch_grid_sample_linear(in_shape: tuple[int, ...], margin: float) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2,) + in_shape).astype(np.float32)
    coords = _random_points(rng, in_shape, (5, 6, 7)[: len(in_shape)], margin)
    out = LinearSampler.at(coords, in_shape).images(x)
    assert out.shape == (2,) + coords.shape[1:] and out.dtype == np.float32
    np.testing.assert_allclose(out, _grid_sample(x, coords, "bilinear"), atol=1e-5)


@pytest.mark.parametrize("margin", [0.0, 2.0], ids=["inside", "outside"])
def test_labels_are_the_per_label_linear_argmax(margin: float) -> None:
    rng = np.random.default_rng(1)
    in_shape = (8, 9, 10)
    seg = rng.integers(0, 4, size=(1,) + in_shape).astype(np.int8)
    seg[0, :4] = 2  # a large region, so most points see one label
    coords = _random_points(rng, in_shape, (6, 7, 8), margin)
    out = LinearSampler.at(coords, in_shape).labels(seg, pad_label=-1)
    # reference: every label's indicator (padding: -1 outside) through grid_sample, then argmax
    labels = np.array([-1, 0, 1, 2, 3])
    padded_ones = _grid_sample(np.ones((1,) + in_shape, np.float32), coords, "bilinear")[0]
    scores = np.stack([_grid_sample((seg == u).astype(np.float32), coords, "bilinear")[0] for u in labels[1:]])
    scores = np.concatenate([(1 - padded_ones)[None], scores])
    top = np.sort(scores, axis=0)
    clear = top[-1] - top[-2] > 1e-3  # near ties are settled by the nearest voxel instead
    assert out.dtype == np.int8 and clear.mean() > 0.8
    np.testing.assert_array_equal(out[0][clear], labels[scores.argmax(0)][clear])
    assert set(np.unique(out)) <= set(np.unique(seg)) | ({-1} if margin else set())
    assert (margin == 0) == (out != -1).all()


def test_label_ties_go_to_the_nearest_voxel() -> None:
    seg = np.array([[2, 0, 0, 1]], np.int8)
    # 0.5 and 2.5 are exact ties between two labels: the lower-index voxel is the nearest there (label 2,
    # then 0), where a plain argmax would give the lowest label (0, 0); 0.75 is no tie (0 wins)
    coords = np.array([[0.5, 2.5, 0.75]])
    np.testing.assert_array_equal(LinearSampler.at(coords, (4,)).labels(seg, -1), [[2, 0, 0]])
    np.testing.assert_array_equal(LinearSampler.at(coords[:, :2] + 0.2, (4,)).labels(seg, -1), [[0, 1]])


def test_integer_points_copy_the_input() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 6, 7, 8)).astype(np.float32)
    seg = rng.integers(0, 3, size=(1, 6, 7, 8)).astype(np.int8)
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in (6, 7, 8)], indexing="ij"))[:, ::-1]
    sampler = LinearSampler.at(coords, (6, 7, 8))
    np.testing.assert_allclose(sampler.images(x), x[:, ::-1], atol=1e-6)
    np.testing.assert_array_equal(sampler.labels(seg, -1), seg[:, ::-1])


@pytest.mark.parametrize("target", [(5, 7, 4), (10, 3, 8), (10, 14, 9)], ids=["half", "mixed", "same"])
def test_low_resolution_equals_torch_nearest_exact_then_linear(target: tuple[int, ...]) -> None:
    x = np.random.default_rng(3).normal(size=(10, 14, 9)).astype(np.float32)
    t = torch.from_numpy(x)[None, None]
    expected = interpolate(interpolate(t, list(target), mode="nearest-exact"), list(x.shape), mode="trilinear")[0, 0]
    out = simulate_low_resolution(x, target)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("grid,rotation", [((5, 6, 7), (0.3, -0.5, 1.1)), ((6, 9), (2.0,))], ids=["3d", "2d"])
def test_sampling_points_are_batchgenerators_rotated_and_scaled_mesh(grid: tuple[int, ...],
                                                                     rotation: tuple[float, ...]) -> None:
    from batchgenerators.augmentations.utils import (
        create_zero_centered_coordinate_mesh,
        rotate_coords_2d,
        rotate_coords_3d,
        scale_coords,
    )

    from autoseg.data.augment import AugParams
    from autoseg.data.augment_cpu import _sampling_points

    spatial_in = tuple(g + 4 for g in grid)
    coords = create_zero_centered_coordinate_mesh(grid)
    coords = rotate_coords_3d(coords, *rotation) if len(grid) == 3 else rotate_coords_2d(coords, rotation[0])
    coords = scale_coords(coords, 0.8)
    for d in range(len(grid)):
        coords[d] += spatial_in[d] / 2.0 - 0.5
    ours = _sampling_points(grid, AugParams(rotation_rad=rotation, scale=0.8), spatial_in)
    np.testing.assert_allclose(ours, coords, atol=1e-9)
