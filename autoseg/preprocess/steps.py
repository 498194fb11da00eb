"""The pure array steps of preprocessing: crop to nonzero, normalize, resample, sample foreground.

Each is a function of arrays and plan values, no I/O; `autoseg.preprocess.case` chains them
into `preprocess_case` in nnU-Net's order (``DefaultPreprocessor``), and inference reuses the
resampling (`autoseg.infer.cascade`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import binary_fill_holes
from skimage.transform import resize

from autoseg.common.errors import AutosegError
from autoseg.planning.plans import ChannelNormalization, Configuration

ANISOTROPY_RATIO = 3.0
"""Resample the coarse axis separately when max/min spacing exceeds this (nnU-Net's ANISO_THRESHOLD)."""

FG_SAMPLES_PER_CLASS = 10_000
"""Foreground voxels stored per class for oversampling (nnU-Net's num_samples, per class)."""

FG_MIN_COVERAGE = 0.01
"""...but at least this fraction of a class's voxels, so large classes stay well covered (nnU-Net)."""

NORM_EPS = 1e-8
"""Floor of a standard deviation or intensity range we divide by (nnU-Net's)."""


def crop_to_nonzero(data: np.ndarray) -> tuple[tuple[tuple[int, int], ...], np.ndarray]:
    """Bounding box of voxels where any channel is nonzero, and the hole-filled mask inside it.

    An all-zero image keeps its full extent. Returns (bbox, mask cropped to bbox).
    """
    mask = np.any(data != 0, axis=0)
    if not mask.any():
        return tuple((0, int(s)) for s in mask.shape), np.ones(mask.shape, bool)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bbox.append((int(hits[0]), int(hits[-1]) + 1))
    box = tuple(slice(a, b) for a, b in bbox)
    return tuple(bbox), binary_fill_holes(mask[box])


def normalize(data: np.ndarray, mask: np.ndarray, schemes: Sequence[ChannelNormalization]) -> np.ndarray:
    """Normalize each channel of float32 (C, ...) data in place by its scheme (see ChannelNormalization)."""
    if len(schemes) != data.shape[0]:
        raise AutosegError(f"the plan normalizes {len(schemes)} channel(s) but the image has {data.shape[0]}")
    for c, norm in enumerate(schemes):
        x = data[c]
        if norm.scheme == "zscore":
            region = mask if norm.use_nonzero_mask and mask.any() else np.ones(x.shape, bool)
            values = x[region]
            x[region] = (values - values.mean()) / max(float(values.std()), NORM_EPS)
        elif norm.scheme == "ct":
            if None in (norm.clip_low, norm.clip_high, norm.mean, norm.std):
                raise AutosegError(f"channel {c}: 'ct' normalization needs clip_low, clip_high, mean and std",
                                   "plans.json:normalization")
            np.clip(x, norm.clip_low, norm.clip_high, out=x)
            x -= norm.mean
            x /= max(float(norm.std), NORM_EPS)
        elif norm.scheme == "rescale_to_0_1":
            lo, hi = float(x.min()), float(x.max())
            x -= lo
            x /= max(hi - lo, NORM_EPS)
        elif norm.scheme == "rgb_to_0_1":
            x /= 255.0
        elif norm.scheme != "none":
            raise AutosegError(f"channel {c}: unknown normalization scheme {norm.scheme!r}",
                               "plans.json:normalization")
    return data


def separate_axis(current_spacing: Sequence[float], new_spacing: Sequence[float]) -> int | None:
    """The axis to resample on its own, or None (nnU-Net's rule).

    The current spacing is checked first, then the new one: if max/min > ANISOTROPY_RATIO,
    the one axis with the largest spacing is the separate one. Two axes sharing the largest
    spacing (e.g. (1, 3, 3)) mean no single coarse axis, hence no separate resampling.
    """
    for spacing in (np.asarray(current_spacing, float), np.asarray(new_spacing, float)):
        if spacing.max() / spacing.min() > ANISOTROPY_RATIO:
            coarse = np.flatnonzero(spacing == spacing.max())
            return int(coarse[0]) if len(coarse) == 1 else None
    return None


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Shape covering the same extent at ``new_spacing`` (rounded, at least 1 voxel)."""
    return tuple(max(1, int(round(s * sp / nsp))) for s, sp, nsp in zip(shape, spacing, new_spacing))


def _resize_nearest_along(array: np.ndarray, axis: int, new_len: int) -> np.ndarray:
    """Nearest-neighbour resize of one axis, sampling at voxel centres (like map_coordinates order 0)."""
    old_len = array.shape[axis]
    if old_len == new_len:
        return array
    pos = (np.arange(new_len) + 0.5) * (old_len / new_len) - 0.5
    idx = np.clip(np.floor(pos + 0.5).astype(int), 0, old_len - 1)
    return np.take(array, idx, axis=axis)


def _resize(volume: np.ndarray, new_shape: tuple[int, ...], order: int, axis: int | None,
            dtype: type = np.float32) -> np.ndarray:
    """Resize a 3D float volume (computed in ``dtype``); with ``axis``, in-plane at ``order`` then that axis
    by nearest."""
    if volume.shape == tuple(new_shape):
        return volume
    if axis is None:
        return resize(volume, new_shape, order=order, mode="edge", anti_aliasing=False).astype(dtype)
    in_plane = list(new_shape)
    in_plane[axis] = volume.shape[axis]
    out = volume
    if tuple(in_plane) != volume.shape:
        # a spline with zoom 1 along `axis` equals resizing every slice on its own (one call,
        # not a Python loop); each slice is then clipped to its own input range, as a
        # per-slice resize would do
        out = resize(volume, tuple(in_plane), order=order, mode="edge", anti_aliasing=False,
                     clip=False).astype(dtype)
        other = tuple(a for a in range(volume.ndim) if a != axis)
        lo = np.expand_dims(volume.min(axis=other), other)
        hi = np.expand_dims(volume.max(axis=other), other)
        out = np.clip(out, lo, hi)
    # nearest along the coarse axis, like nnU-Net's order_z = 0: thick slices are not blended
    return _resize_nearest_along(out, axis, new_shape[axis])


def resample_data(data: np.ndarray, new_shape: tuple[int, ...], order: int, axis: int | None,
                  dtype: type = np.float32) -> np.ndarray:
    """Resample float (C, *spatial) data channel by channel, computed in and returned as ``dtype``
    (float64 where float16 logits must round as nnU-Net's float64 resampling does)."""
    return np.stack([_resize(data[c].astype(dtype, copy=False), new_shape, order, axis, dtype)
                     for c in range(data.shape[0])]).astype(dtype, copy=False)


def resample_seg(seg: np.ndarray, new_shape: tuple[int, ...], labels: Sequence[int], order: int,
                 axis: int | None) -> np.ndarray:
    """Resample a (z, y, x) label map via each label's interpolated one-hot mask, then argmax.

    Only values in ``labels`` can appear in the output, so resampling never invents a label
    (a plain spline on label values would create e.g. 1s between 0 and 2). Labels absent
    from ``seg`` are skipped: their mask interpolates to 0 everywhere and can never win.
    Pass the ignore label among ``labels``: it then competes like a class, so unannotated
    regions keep their extent instead of turning into background or a class.
    """
    if seg.shape == tuple(new_shape):
        return seg.copy()
    best = np.full(new_shape, -1.0, np.float32)
    out = np.zeros(new_shape, seg.dtype)
    present = set(np.unique(seg).tolist())
    for label in (lab for lab in labels if lab in present):
        score = _resize((seg == label).astype(np.float32), new_shape, order, axis)
        better = score > best
        out[better] = label
        best[better] = score[better]
    return out


def sample_foreground(seg: np.ndarray, classes: Sequence[int], rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Up to FG_SAMPLES_PER_CLASS voxel coordinates per class (at least FG_MIN_COVERAGE of them).

    Training oversamples foreground patches from these, instead of scanning the volume.
    Returns class -> (N, 3) int32 array (N == 0 for a class absent from this case).
    """
    out: dict[int, np.ndarray] = {}
    for c in classes:
        locs = np.argwhere(seg == c)
        if len(locs) == 0:
            out[c] = np.zeros((0, seg.ndim), np.int32)
            continue
        n = max(min(FG_SAMPLES_PER_CLASS, len(locs)), int(np.ceil(len(locs) * FG_MIN_COVERAGE)))
        pick = np.sort(rng.choice(len(locs), n, replace=False))
        out[c] = locs[pick].astype(np.int32)
    return out


def target_spacing(config: Configuration, transposed_spacing: Sequence[float]) -> tuple[float, float, float]:
    """The spacing a case is resampled to: the config's, or for 2D (own axis-0 spacing, *in-plane)."""
    if config.ndim == 2:
        return (float(transposed_spacing[0]), *map(float, config.spacing))  # type: ignore[return-value]
    if len(config.spacing) != 3:
        raise AutosegError(f"configuration {config.name!r} has {len(config.spacing)} spacing entries, expected 3",
                           f"plans.json:{config.name}.spacing")
    return tuple(map(float, config.spacing))  # type: ignore[return-value]
