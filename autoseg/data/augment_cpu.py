"""The CPU augmentation path: `apply_augmentation` applies one sample's `AugParams`, in numpy.

It runs per sample in the data-loader workers (``augment.device=cpu``), as nnU-Net does; the
params come from `autoseg.data.augment.sample_params`. The spatial part rotates
batchgenerators' coordinates (``rotate_coords_*``) and resamples linearly, as nnU-Net 2.8.1
does (`autoseg.data.interpolate`).

Order, as in nnU-Net: rotation/scaling (+ crop to the patch), Gaussian noise, Gaussian blur,
multiplicative brightness, contrast, simulated low resolution, inverted gamma, gamma, mirroring,
then `restore_masked_background` (masked channels zeroed outside the nonzero mask, label -1 -> 0).
Arrays are one sample: data (C, *spatial) float32, seg (1, *spatial) integer labels.
Labels are moved only by flips, crops and per-label interpolation + argmax, so an output
voxel always holds a label present in the input (the ignore label included) or background
where the patch reaches outside the case.
"""

from __future__ import annotations

import numpy as np
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d, scale_coords
from scipy.ndimage import gaussian_filter

from autoseg.data.augment import PAD_LABEL, AugmentSetup, AugParams, restore_masked_background
from autoseg.data.interpolate import LinearSampler, simulate_low_resolution

ORDER_DATA = 1
"""Images under rotation/scaling are interpolated linearly (nnU-Net 2.8.1's SpatialTransform:
``mode_image='bilinear'``, i.e. torch ``grid_sample`` linear in 2D and 3D; batchgenerators v1 used 3)."""

ORDER_SEG = 1
"""Segmentations are resampled linearly per label, then argmax (nnU-Net 2.8.1: ``mode_seg='bilinear'``)."""

LOWRES_MODE_DOWN, LOWRES_MODE_UP = "nearest-exact", "linear"
"""Simulated low resolution: down with nearest-exact, back up linearly (nnU-Net 2.8.1's
SimulateLowResolutionTransform: torch ``interpolate`` modes ``nearest-exact`` and ``(bi|tri)linear``)."""


def center_crop(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Central ``size`` window of the spatial axes of a (C, *spatial) array."""
    starts = [(s - p) // 2 for s, p in zip(array.shape[1:], size)]
    return array[(slice(None),) + tuple(slice(b, b + p) for b, p in zip(starts, size))]


def _sampling_points(grid_shape: tuple[int, ...], params: AugParams, spatial_in: tuple[int, ...]) -> np.ndarray:
    """Input voxel coordinates (ndim, *grid_shape) of the final patch's voxels: the patch grid, centred,
    rotated and scaled, placed at the centre of the initial patch.

    batchgenerators' ``rotate_coords_*`` and ``scale_coords`` are linear, so they are applied once to
    the unit vectors and the grid is built from the resulting matrix by broadcasting.
    """
    ndim = len(grid_shape)
    matrix = np.eye(ndim)
    if params.rotation_rad is not None:
        matrix = (rotate_coords_3d(matrix, *params.rotation_rad) if ndim == 3
                  else rotate_coords_2d(matrix, params.rotation_rad[0]))
    if params.scale is not None:
        matrix = scale_coords(matrix, params.scale)
    axes = [np.arange(n, dtype=np.float64) - (n - 1) / 2.0 for n in grid_shape]
    coords = np.empty((ndim,) + tuple(grid_shape), np.float64)
    for d in range(ndim):
        coords[d] = spatial_in[d] / 2.0 - 0.5
        for k in range(ndim):
            shape = [1] * ndim
            shape[k] = grid_shape[k]
            coords[d] += matrix[d, k] * axes[k].reshape(shape)
    return coords


def _spatial_transform(data: np.ndarray, seg: np.ndarray, params: AugParams,
                       setup: AugmentSetup) -> tuple[np.ndarray, np.ndarray]:
    """Rotate/scale the sampling grid about the centre of the initial patch and interpolate the final patch.

    Images linearly (outside: 0), labels per label linearly + argmax (outside: `PAD_LABEL`).
    Dummy 2D applies one in-plane transform to every slice of the centre ``patch_size[0]`` slices.
    """
    if setup.dummy_2d:
        z0 = (data.shape[1] - setup.patch_size[0]) // 2
        data = data[:, z0:z0 + setup.patch_size[0]]
        seg = seg[:, z0:z0 + setup.patch_size[0]]
        grid_shape, spatial_in = setup.patch_size[1:], data.shape[2:]
    else:
        grid_shape, spatial_in = setup.patch_size, data.shape[1:]
    sampler = LinearSampler.at(_sampling_points(grid_shape, params, spatial_in), tuple(spatial_in))
    return sampler.images(data), sampler.labels(np.asarray(seg), PAD_LABEL)


def _gamma(x: np.ndarray, gamma: float, invert: bool) -> np.ndarray:
    """Gamma on the [min, max]-normalized image, then restore mean and std (nnU-Net's retain_stats)."""
    x = -x if invert else x
    mean, std = x.mean(), x.std()
    low, span = x.min(), float(x.max() - x.min())
    x = np.power((x - low) / (span + 1e-7), gamma) * (span + 1e-7) + low
    x = (x - x.mean()) / (x.std() + 1e-8) * std + mean
    return -x if invert else x


def _lowres(x: np.ndarray, zoom: float, ignore_axes: tuple[int, ...]) -> np.ndarray:
    """Downsample by ``zoom`` and back up (`LOWRES_MODE_DOWN`/`LOWRES_MODE_UP`): simulates a coarser scan."""
    shape = np.array(x.shape)
    target = np.maximum(np.round(shape * zoom).astype(int), 1)
    for a in ignore_axes:
        target[a] = shape[a]
    return simulate_low_resolution(x, tuple(int(t) for t in target))


def apply_augmentation(data: np.ndarray, seg: np.ndarray, params: AugParams,
                       setup: AugmentSetup) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``params`` to one sample cut at ``setup.initial_patch_size``; returns the final patch.

    Deterministic: the same inputs and params give the same output. data (C, *initial) float,
    seg (1, *initial) integer labels -> data (C, *patch) float32, seg (1, *patch).
    """
    if params.rotation_rad is not None or params.scale is not None:
        data, seg = _spatial_transform(data, seg, params, setup)
    else:
        data = np.array(center_crop(data, setup.patch_size), dtype=np.float32)
        seg = np.array(center_crop(seg, setup.patch_size))
    if params.noise_std is not None:
        noise_rng = np.random.default_rng(params.noise_seed)
        data += noise_rng.normal(0.0, params.noise_std, size=data.shape).astype(np.float32)
    for c, sigma in enumerate(params.blur_sigma):
        if sigma is not None:
            data[c] = gaussian_filter(data[c], sigma, order=0)
    if params.brightness is not None:
        for c, factor in enumerate(params.brightness):
            data[c] *= factor
    if params.contrast is not None:
        for c, factor in enumerate(params.contrast):
            low, high, mean = data[c].min(), data[c].max(), data[c].mean()
            data[c] = np.clip((data[c] - mean) * factor + mean, low, high)
    for c, zoom in enumerate(params.lowres_zoom):
        if zoom is not None:
            data[c] = _lowres(data[c], zoom, setup.lowres_ignore_axes)
    for values, invert in ((params.gamma_inverted, True), (params.gamma, False)):
        if values is not None:
            for c, g in enumerate(values):
                data[c] = _gamma(data[c], g, invert)
    if params.mirror_axes:
        axes = tuple(a + 1 for a in params.mirror_axes)
        data = np.flip(data, axes)
        seg = np.flip(seg, axes)
    data, seg = np.ascontiguousarray(data, dtype=np.float32), np.ascontiguousarray(seg)
    return restore_masked_background(data, seg, setup.masked_channels)


def downsample_seg_for_ds(seg: np.ndarray, scales: list[tuple[float, ...]]) -> list[np.ndarray]:
    """Nearest-neighbour copies of a (B, 1, *patch) target at each deep-supervision scale.

    Output ``i`` has shape ``round(patch * scales[i])``, matching the U-Net's output ``i``.
    Nearest (never interpolated) so labels stay labels: the ignore label of sparse
    annotations reaches every scale as the ignore label, never as background or a class.
    """
    out = []
    spatial = seg.shape[2:]
    for scale in scales:
        if all(s == 1.0 for s in scale):
            out.append(seg)
            continue
        index = []
        for n, s in zip(spatial, scale):
            m = max(1, int(round(n * s)))
            index.append(np.minimum(((np.arange(m) + 0.5) * (n / m)).astype(np.int64), n - 1))
        out.append(seg[(slice(None), slice(None)) + np.ix_(*index)])
    return out
