"""Training augmentation with nnU-Net v2's defaults, as "sample parameters, then apply".

`AugmentConfig` holds every switch, probability and range (user-facing as
``--set augment.<field>=...``); the defaults are nnU-Net v2's ``get_training_transforms``.
`augmentation_setup` resolves it for one `Configuration` (enlarged initial patch, rotation
ranges, "dummy 2D" for anisotropic 3D patches, mirror axes). Per sample, `sample_params` draws
an `AugParams` record from a `np.random.Generator` and `apply_augmentation` applies it
deterministically, so a seed reproduces a batch exactly and a sample's augmentation can be
logged and replayed. The spatial part uses batchgenerators' coordinate helpers
(``create_zero_centered_coordinate_mesh``, ``rotate_coords_*``, ``interpolate_img``).

Order, as in nnU-Net: rotation/scaling (+ crop to the patch), Gaussian noise, Gaussian blur,
multiplicative brightness, contrast, simulated low resolution, inverted gamma, gamma, mirroring.
Arrays are one sample: data (C, *spatial) float32, seg (1, *spatial) integer labels.
Labels are moved only by flips, crops and per-label interpolation + argmax, so an output
voxel always holds a label present in the input (the ignore label included).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
from batchgenerators.augmentations.utils import (
    create_zero_centered_coordinate_mesh,
    interpolate_img,
    rotate_coords_2d,
    rotate_coords_3d,
    scale_coords,
)
from scipy.ndimage import gaussian_filter
from skimage.transform import resize

from autoseg.common.errors import ConfigError
from autoseg.planning.plans import Configuration

logger = logging.getLogger(__name__)

DUMMY_2D_ANISOTROPY_RATIO = 3.0
"""A 3D patch with max(patch) / patch[0] > 3 is rotated/scaled in-plane only ("dummy 2D", nnU-Net's ANISO_THRESHOLD)."""

ELONGATED_2D_RATIO = 1.5
"""A 2D patch with max/min side > 1.5 uses the small rotation range (nnU-Net's rule)."""

ENLARGEMENT_MIN_SCALE = 0.85
"""The initial patch is divided by this to leave room for scaling (nnU-Net uses (0.85, 1.25) there, not 0.7)."""

ORDER_DATA = 3
"""Spline order for images under rotation/scaling (nnU-Net: 3)."""

ORDER_SEG = 1
"""Segmentations are resampled linearly per label, then argmax (nnU-Net: order 1)."""

LOWRES_ORDER_DOWN, LOWRES_ORDER_UP = 0, 3
"""Simulated low resolution: nearest down, cubic back up (nnU-Net's SimulateLowResolutionTransform)."""

AUGMENT_DEVICES = ("auto", "cpu", "device")
"""Where augmentation runs: ``cpu`` in the data-loader workers (per sample, numpy/scipy, as nnU-Net);
``device`` batched as torch ops on the training device after the workers only crop; ``auto`` picks
the faster of the two for the device type (benchmarks/bench_augment.py)."""


@dataclass(frozen=True)
class AugmentConfig:
    """Every augmentation switch and range; defaults are nnU-Net v2's. Probabilities are per sample."""

    device: str = "auto"
    """Where augmentation runs, one of `AUGMENT_DEVICES` (auto, cpu, device)."""
    mirror: bool = True
    """Flip each spatial axis with probability 0.5 (and use the same axes for test-time mirroring)."""
    rotation: bool = True
    """Random rotation."""
    p_rotation: float = 0.2
    """Probability that a sample is rotated."""
    rotation_deg_3d: float = 30.0
    """3D: angle range +-deg about each axis."""
    rotation_deg_2d: float = 180.0
    """2D and dummy-2D: in-plane angle range +-deg."""
    rotation_deg_2d_elongated: float = 15.0
    """2D patches with aspect ratio > 1.5: in-plane angle range +-deg."""
    dummy_2d: bool = True
    """Rotate/scale anisotropic 3D patches (max/first axis > 3) in-plane only."""
    scaling: bool = True
    """Random isotropic zoom."""
    p_scaling: float = 0.2
    """Probability that a sample is scaled."""
    scale_range: tuple[float, float] = (0.7, 1.4)
    """Zoom factor range applied to the sampling grid (< 1 zooms in)."""
    noise: bool = True
    """Additive Gaussian noise."""
    p_noise: float = 0.1
    """Probability of noise per sample."""
    noise_std: tuple[float, float] = (0.0, 0.1)
    """Range of the noise standard deviation (nnU-Net calls it noise_variance but uses it as std)."""
    blur: bool = True
    """Gaussian blur."""
    p_blur: float = 0.2
    """Probability of blur per sample."""
    p_blur_channel: float = 0.5
    """Probability of blurring each channel of a selected sample."""
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    """Blur sigma range in voxels (drawn per channel)."""
    brightness: bool = True
    """Multiplicative brightness."""
    p_brightness: float = 0.15
    """Probability of brightness change per sample."""
    brightness_range: tuple[float, float] = (0.75, 1.25)
    """Multiplier range (drawn per channel)."""
    contrast: bool = True
    """Contrast change around the mean, clipped to the original range."""
    p_contrast: float = 0.15
    """Probability of contrast change per sample."""
    contrast_range: tuple[float, float] = (0.75, 1.25)
    """Contrast factor range (drawn per channel)."""
    lowres: bool = True
    """Simulated low resolution (downsample nearest, upsample cubic)."""
    p_lowres: float = 0.25
    """Probability of simulated low resolution per sample."""
    p_lowres_channel: float = 0.5
    """Probability per channel of a selected sample."""
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    """Downsampling factor range."""
    gamma: bool = True
    """Gamma transform (and its inverted-image variant), keeping mean and std."""
    p_gamma: float = 0.3
    """Probability of the gamma transform per sample."""
    p_gamma_inverted: float = 0.1
    """Probability of the gamma transform on the inverted image per sample (applied before the plain one)."""
    gamma_range: tuple[float, float] = (0.7, 1.5)
    """Gamma range (half the draws below 1, half above)."""

    def __post_init__(self) -> None:
        if self.device not in AUGMENT_DEVICES:
            raise ConfigError(f"must be one of {list(AUGMENT_DEVICES)}, got {self.device!r}", where="augment.device")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ConfigError(f"probability must be in [0, 1], got {value}", where=f"augment.{f.name}")
            if isinstance(value, tuple) and (len(value) != 2 or value[0] > value[1] or value[0] < 0):
                raise ConfigError(f"range must be (low, high) with 0 <= low <= high, got {value}",
                                  where=f"augment.{f.name}")
            if f.name.startswith("rotation_deg") and value < 0:
                raise ConfigError(f"angle must be >= 0, got {value}", where=f"augment.{f.name}")
        if self.scale_range[0] <= 0 or self.gamma_range[0] <= 0 or self.lowres_zoom[0] <= 0:
            raise ConfigError("scale_range, gamma_range and lowres_zoom must be > 0", where="augment")

    @classmethod
    def disabled(cls) -> "AugmentConfig":
        """Every augmentation off: the pipeline only crops (validation, debugging)."""
        switches = {f.name: False for f in dataclasses.fields(cls) if f.type in (bool, "bool")}
        return cls(**switches)


def resolve_augment_device(device: str, on_cuda: bool) -> str:
    """Where augmentation actually runs: ``auto`` is ``device`` on a CUDA device and ``cpu`` otherwise.

    One rule for the trainer (which picks its pipeline by it) and the scheduler (which sizes a
    training's CPU share by it: a GPU-augmented training needs 1-2 cores, a CPU-augmented one many).
    ``cpu`` and ``device`` are returned as given; anything else is a `ConfigError`.
    """
    if device not in AUGMENT_DEVICES:
        raise ConfigError(f"must be one of {list(AUGMENT_DEVICES)}, got {device!r}", where="augment.device")
    if device == "auto":
        return "device" if on_cuda else "cpu"
    return device


@dataclass(frozen=True)
class AugmentSetup:
    """`AugmentConfig` resolved for one configuration's patch: what `sample_params` needs."""

    augment: AugmentConfig
    patch_size: tuple[int, ...]
    """Final patch (what the network sees)."""
    initial_patch_size: tuple[int, ...]
    """Patch cut from the case before rotation/scaling, large enough that rotated corners stay inside."""
    rotation_max_rad: tuple[float, ...]
    """Max |angle| per rotation: 3D (about axes 0, 1, 2); 2D and dummy 2D one in-plane angle."""
    dummy_2d: bool
    mirror_axes: tuple[int, ...]
    lowres_ignore_axes: tuple[int, ...]


@dataclass(frozen=True)
class AugParams:
    """One sample's drawn augmentation; None / empty means "not applied". Per-channel tuples use None per skipped channel."""

    rotation_rad: tuple[float, ...] | None = None
    scale: float | None = None
    noise_std: float | None = None
    noise_seed: int = 0
    blur_sigma: tuple[float | None, ...] = ()
    brightness: tuple[float, ...] | None = None
    contrast: tuple[float, ...] | None = None
    lowres_zoom: tuple[float | None, ...] = ()
    gamma_inverted: tuple[float, ...] | None = None
    gamma: tuple[float, ...] | None = None
    mirror_axes: tuple[int, ...] = ()


# ----------------------------------------------------------------------------------- setup


def is_dummy_2d(patch_size: tuple[int, ...], augment: AugmentConfig) -> bool:
    """nnU-Net's rule: a 3D patch much shorter along axis 0 gets in-plane spatial augmentation only."""
    return (augment.dummy_2d and len(patch_size) == 3
            and max(patch_size) / patch_size[0] > DUMMY_2D_ANISOTROPY_RATIO)


def training_mirror_axes(config: Configuration, augment: AugmentConfig) -> tuple[int, ...]:
    """Spatial axes mirrored during training (all of them, as nnU-Net; none if mirroring is off).

    Inference mirrors along the same axes for test-time augmentation. Anisotropic patches are
    still mirrored along every axis: a flip, unlike a rotation, does not mix the coarse axis
    with the fine ones.
    """
    return tuple(range(config.ndim)) if augment.mirror else ()


def _rotated_extent(a: float, b: float, max_angle: float) -> tuple[float, float]:
    """Bounding box of an a x b rectangle rotated by any angle in [-max_angle, max_angle]."""
    theta = min(abs(max_angle), math.pi / 2)

    def extent(u: float, v: float) -> float:
        # u|cos t| + v|sin t| grows until atan(v/u), where it reaches the diagonal
        if theta >= math.atan2(v, u):
            return math.hypot(u, v)
        return u * math.cos(theta) + v * math.sin(theta)

    return extent(a, b), extent(b, a)


def initial_patch_size(patch_size: tuple[int, ...], rotation_max_rad: tuple[float, ...], dummy_2d: bool,
                       scaling: bool) -> tuple[int, ...]:
    """The patch to cut before rotation/scaling so that the final patch is filled with image.

    Like nnU-Net's ``get_patch_size``: the largest box over single-axis rotations, divided by
    the smallest scale (0.85); dummy 2D keeps axis 0 as is. We take the rotated rectangle's
    exact bounding box (nnU-Net rotates only the patch diagonal's end point), rounded up so
    that the margin around the final patch is even.
    """
    size = [float(p) for p in patch_size]
    if len(patch_size) == 2 or dummy_2d:
        i, j = len(patch_size) - 2, len(patch_size) - 1
        size[i], size[j] = _rotated_extent(size[i], size[j], rotation_max_rad[0])
    else:
        out = list(size)
        for angle, (i, j) in zip(rotation_max_rad, ((1, 2), (0, 2), (0, 1))):
            ei, ej = _rotated_extent(patch_size[i], patch_size[j], angle)
            out[i], out[j] = max(out[i], ei), max(out[j], ej)
        size = out
    if scaling:
        size = [s / ENLARGEMENT_MIN_SCALE for s in size]
    result = [max(int(math.ceil(s - 1e-6)), p) for s, p in zip(size, patch_size)]
    # an even margin puts the rotation centre exactly on the centre crop (no half-voxel shift
    # between rotated and unrotated samples)
    result = [r + (r - p) % 2 for r, p in zip(result, patch_size)]
    if dummy_2d:
        result[0] = patch_size[0]
    return tuple(result)


def augmentation_setup(config: Configuration, augment: AugmentConfig) -> AugmentSetup:
    """Resolve rotation ranges, dummy 2D, mirror axes and the enlarged initial patch for ``config``."""
    patch = tuple(int(p) for p in config.patch_size)
    dummy = is_dummy_2d(patch, augment)
    if len(patch) == 2:
        deg = augment.rotation_deg_2d_elongated if max(patch) / min(patch) > ELONGATED_2D_RATIO \
            else augment.rotation_deg_2d
        rotation = (math.radians(deg),)
    elif dummy:
        rotation = (math.radians(augment.rotation_deg_2d),)
    else:
        rotation = (math.radians(augment.rotation_deg_3d),) * 3
    if not augment.rotation:
        rotation = tuple(0.0 for _ in rotation)
    initial = initial_patch_size(patch, rotation, dummy, augment.scaling)
    _warn_no_ops(augment)
    return AugmentSetup(augment=augment, patch_size=patch, initial_patch_size=initial, rotation_max_rad=rotation,
                        dummy_2d=dummy, mirror_axes=training_mirror_axes(config, augment),
                        lowres_ignore_axes=(0,) if dummy else ())


_SWITCH_PROBABILITIES = {"rotation": ("p_rotation",), "scaling": ("p_scaling",), "noise": ("p_noise",),
                         "blur": ("p_blur", "p_blur_channel"), "brightness": ("p_brightness",),
                         "contrast": ("p_contrast",), "lowres": ("p_lowres", "p_lowres_channel"),
                         "gamma": ("p_gamma", "p_gamma_inverted")}


def _warn_no_ops(augment: AugmentConfig) -> None:
    """A transform switched on whose probability makes it never fire is probably a typo in a sweep."""
    for switch, probabilities in _SWITCH_PROBABILITIES.items():
        values = [getattr(augment, p) for p in probabilities]
        if getattr(augment, switch) and (values[0] == 0.0 if switch != "gamma" else not any(values)):
            logger.warning("augment.%s is on but %s = 0: it never applies (set augment.%s=false to silence)",
                           switch, " / ".join(probabilities), switch)


def crop_only_setup(config: Configuration) -> AugmentSetup:
    """No augmentation and no enlargement: validation batches are plain crops of the patch size."""
    return augmentation_setup(config, AugmentConfig.disabled())


# ----------------------------------------------------------------------------------- sampling


def _two_sided(rng: np.random.Generator, low: float, high: float) -> float:
    """Half the draws in [low, 1), half in [1, high] when the range straddles 1 (batchgenerators' rule)."""
    if low < 1 and rng.random() < 0.5:
        return float(rng.uniform(low, 1.0))
    return float(rng.uniform(max(low, 1.0), high))


def sample_params(rng: np.random.Generator, setup: AugmentSetup, num_channels: int) -> AugParams:
    """Draw one sample's augmentation. Draw order is fixed, so a seed fixes every parameter."""
    cfg = setup.augment
    rotation = None
    if cfg.rotation and rng.random() < cfg.p_rotation:
        rotation = tuple(float(rng.uniform(-m, m)) for m in setup.rotation_max_rad)
    scale = _two_sided(rng, *cfg.scale_range) if cfg.scaling and rng.random() < cfg.p_scaling else None
    noise_std, noise_seed = None, 0
    if cfg.noise and rng.random() < cfg.p_noise:
        noise_std = float(rng.uniform(*cfg.noise_std))
        noise_seed = int(rng.integers(2**31))
    blur: tuple[float | None, ...] = ()
    if cfg.blur and rng.random() < cfg.p_blur:
        blur = tuple(float(rng.uniform(*cfg.blur_sigma)) if rng.random() < cfg.p_blur_channel else None
                     for _ in range(num_channels))
    brightness = None
    if cfg.brightness and rng.random() < cfg.p_brightness:
        brightness = tuple(float(rng.uniform(*cfg.brightness_range)) for _ in range(num_channels))
    contrast = None
    if cfg.contrast and rng.random() < cfg.p_contrast:
        contrast = tuple(_two_sided(rng, *cfg.contrast_range) for _ in range(num_channels))
    lowres: tuple[float | None, ...] = ()
    if cfg.lowres and rng.random() < cfg.p_lowres:
        lowres = tuple(float(rng.uniform(*cfg.lowres_zoom)) if rng.random() < cfg.p_lowres_channel else None
                       for _ in range(num_channels))
    gamma_inv = gamma = None
    if cfg.gamma and rng.random() < cfg.p_gamma_inverted:
        gamma_inv = tuple(_two_sided(rng, *cfg.gamma_range) for _ in range(num_channels))
    if cfg.gamma and rng.random() < cfg.p_gamma:
        gamma = tuple(_two_sided(rng, *cfg.gamma_range) for _ in range(num_channels))
    mirror = tuple(a for a in setup.mirror_axes if rng.random() < 0.5)
    return AugParams(rotation_rad=rotation, scale=scale, noise_std=noise_std, noise_seed=noise_seed,
                     blur_sigma=blur, brightness=brightness, contrast=contrast, lowres_zoom=lowres,
                     gamma_inverted=gamma_inv, gamma=gamma, mirror_axes=mirror)


# ----------------------------------------------------------------------------------- applying


def center_crop(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Central ``size`` window of the spatial axes of a (C, *spatial) array."""
    starts = [(s - p) // 2 for s, p in zip(array.shape[1:], size)]
    return array[(slice(None),) + tuple(slice(b, b + p) for b, p in zip(starts, size))]


def _spatial_transform(data: np.ndarray, seg: np.ndarray, params: AugParams,
                       setup: AugmentSetup) -> tuple[np.ndarray, np.ndarray]:
    """Rotate/scale the sampling grid about the centre of the initial patch and interpolate the final patch."""
    in_plane = setup.dummy_2d
    grid_shape = setup.patch_size[1:] if in_plane else setup.patch_size
    coords = create_zero_centered_coordinate_mesh(grid_shape)
    if params.rotation_rad is not None:
        if len(grid_shape) == 3:
            coords = rotate_coords_3d(coords, *params.rotation_rad)
        else:
            coords = rotate_coords_2d(coords, params.rotation_rad[0])
    if params.scale is not None:
        coords = scale_coords(coords, params.scale)
    spatial_in = data.shape[2:] if in_plane else data.shape[1:]
    for d in range(len(grid_shape)):
        coords[d] += spatial_in[d] / 2.0 - 0.5
    out_data = np.zeros((data.shape[0],) + setup.patch_size, dtype=np.float32)
    out_seg = np.zeros((seg.shape[0],) + setup.patch_size, dtype=seg.dtype)
    if in_plane:
        # dummy 2D: the same in-plane transform for every slice along axis 0 (the patch keeps that axis)
        z0 = (data.shape[1] - setup.patch_size[0]) // 2
        for z in range(setup.patch_size[0]):
            _resample_into(out_data[:, z], out_seg[:, z], data[:, z0 + z], seg[:, z0 + z], coords)
    else:
        _resample_into(out_data, out_seg, data, seg, coords)
    return out_data, out_seg


def _resample_into(out_data: np.ndarray, out_seg: np.ndarray, data: np.ndarray, seg: np.ndarray,
                   coords: np.ndarray) -> None:
    """Interpolate every channel at ``coords``: images cubic, labels linear per label + argmax; outside = 0."""
    for c in range(data.shape[0]):
        out_data[c] = interpolate_img(np.asarray(data[c], dtype=np.float32), coords, ORDER_DATA, "constant", 0.0)
    for c in range(seg.shape[0]):
        out_seg[c] = interpolate_img(np.asarray(seg[c]), coords, ORDER_SEG, "constant", 0, is_seg=True)


def _gamma(x: np.ndarray, gamma: float, invert: bool) -> np.ndarray:
    """Gamma on the [min, max]-normalized image, then restore mean and std (nnU-Net's retain_stats)."""
    x = -x if invert else x
    mean, std = x.mean(), x.std()
    low, span = x.min(), float(x.max() - x.min())
    x = np.power((x - low) / (span + 1e-7), gamma) * (span + 1e-7) + low
    x = (x - x.mean()) / (x.std() + 1e-8) * std + mean
    return -x if invert else x


def _lowres(x: np.ndarray, zoom: float, ignore_axes: tuple[int, ...]) -> np.ndarray:
    """Downsample by ``zoom`` (nearest) and back up (cubic): simulates a coarser scan."""
    shape = np.array(x.shape)
    target = np.maximum(np.round(shape * zoom).astype(int), 1)
    for a in ignore_axes:
        target[a] = shape[a]
    small = resize(x.astype(np.float64), target, order=LOWRES_ORDER_DOWN, mode="edge", anti_aliasing=False)
    return resize(small, shape, order=LOWRES_ORDER_UP, mode="edge", anti_aliasing=False)


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
    return np.ascontiguousarray(data, dtype=np.float32), np.ascontiguousarray(seg)


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
