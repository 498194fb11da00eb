"""Training augmentation with nnU-Net v2's defaults, as "sample parameters, then apply".

`AugmentConfig` holds every switch, probability and range (user-facing as
``--set augment.<field>=...``); the defaults are nnU-Net v2's ``get_training_transforms``.
`augmentation_setup` resolves it for one `Configuration` (enlarged initial patch, rotation
ranges, "dummy 2D" for anisotropic 3D patches, mirror axes). Per sample, `sample_params` draws
an `AugParams` record from a `np.random.Generator`; applying it is deterministic, so a seed
reproduces a batch exactly and a sample's augmentation can be logged and replayed. Two paths
apply the same params: `autoseg.data.augment_cpu.apply_augmentation` per sample in the loader
workers (numpy, as nnU-Net), and `autoseg.data.augment_device.augment_batch` batched as torch
ops on the training device. Both end with `restore_masked_background` (masked channels zeroed
outside the nonzero mask, label -1 -> 0), defined here for numpy arrays and torch tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from autoseg.common.errors import ConfigError
from autoseg.planning.plans import ChannelNormalization, Configuration

logger = logging.getLogger(__name__)

ArrayT = TypeVar("ArrayT")
"""A numpy array or a torch tensor (`restore_masked_background` runs on both)."""

DUMMY_2D_ANISOTROPY_RATIO = 3.0
"""A 3D patch with max(patch) / patch[0] > 3 is rotated/scaled in-plane only ("dummy 2D", nnU-Net's ANISO_THRESHOLD)."""

ELONGATED_2D_RATIO = 1.5
"""A 2D patch with max/min side > 1.5 uses the small rotation range (nnU-Net's rule)."""

ENLARGEMENT_MIN_SCALE = 0.85
"""The initial patch is divided by this to leave room for scaling (nnU-Net uses (0.85, 1.25) there, not 0.7)."""

PAD_LABEL = -1
"""Label of everything outside the case (patch padding) and outside the nonzero mask when a channel is
normalized inside it (nnU-Net 2.8.1: ``padding_value_seg=-1``, the loader's seg padding -1, and
preprocessing's ``nonzero_label=-1``); `restore_masked_background` turns it into background."""

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
    mirror_axes: tuple[int, ...] | None = None
    """The spatial axes ``mirror`` flips (network axis order); None = every axis. Set for models whose
    training mirrored fewer axes (an imported nnU-Net trainer's ``inference_allowed_mirroring_axes``)."""
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
    """Simulated low resolution (downsample nearest-exact, back up linearly)."""
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
        axes = self.mirror_axes
        if axes is not None and (len(set(axes)) != len(axes) or any(not 0 <= int(a) <= 2 for a in axes)):
            raise ConfigError(f"must be distinct spatial axes 0..2 or none, got {axes}", where="augment.mirror_axes")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "mirror_axes":
                continue
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
    masked_channels: tuple[int, ...] = ()
    """Image channels normalized inside the nonzero mask: zeroed where the label is `PAD_LABEL` after
    the intensity transforms (`restore_masked_background`)."""


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
    """Spatial axes mirrored during training (all of them, as nnU-Net; none if mirroring is off;
    ``augment.mirror_axes`` when given).

    Inference mirrors along the same axes for test-time augmentation. Anisotropic patches are
    still mirrored along every axis: a flip, unlike a rotation, does not mix the coarse axis
    with the fine ones.
    """
    if not augment.mirror:
        return ()
    if augment.mirror_axes is None:
        return tuple(range(config.ndim))
    return tuple(sorted(int(a) for a in augment.mirror_axes if int(a) < config.ndim))


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


def resolve_augment_device(setting: str, device_type: str) -> str:
    """``cpu`` or ``device``: where augmentation of a run on ``device_type`` (cpu, cuda) takes place.

    ``auto`` means ``device`` on a GPU, where one process augments faster than a dozen CPU workers
    (benchmarks/bench_augment.py), and ``cpu`` on the CPU, where data workers overlap augmentation
    with the training step on other cores instead of adding it to the step's own core. One rule
    for the trainer (which picks its pipeline by it) and the scheduler (which sizes a training's
    CPU share by it: a device-augmented training needs 1-2 cores, a CPU-augmented one many).
    """
    if setting not in AUGMENT_DEVICES:
        raise ConfigError(f"must be one of {list(AUGMENT_DEVICES)}, got {setting!r}", where="augment.device")
    if setting != "auto":
        return setting
    return "device" if device_type == "cuda" else "cpu"


def augmentation_setup(config: Configuration, augment: AugmentConfig,
                       masked_channels: tuple[int, ...] = ()) -> AugmentSetup:
    """Resolve rotation ranges, dummy 2D, mirror axes and the enlarged initial patch for ``config``.

    ``masked_channels``: image channels normalized inside the nonzero mask (see `masked_channels`).
    """
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
                        lowres_ignore_axes=(0,) if dummy else (), masked_channels=tuple(masked_channels))


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


def crop_only_setup(config: Configuration, masked_channels: tuple[int, ...] = ()) -> AugmentSetup:
    """No augmentation and no enlargement: validation batches are plain crops of the patch size."""
    return augmentation_setup(config, AugmentConfig.disabled(), masked_channels)


def masked_channels(normalization: Sequence[ChannelNormalization]) -> tuple[int, ...]:
    """Channels normalized inside the nonzero mask (``use_nonzero_mask``): nnU-Net's ``use_mask_for_norm``."""
    return tuple(c for c, n in enumerate(normalization) if n.use_nonzero_mask)


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


def restore_masked_background(data: ArrayT, seg: ArrayT, masked: Sequence[int],
                              channel_axis: int = 0) -> tuple[ArrayT, ArrayT]:
    """Zero the ``masked`` image channels where label channel 0 is negative, then make negative labels 0.

    The last step of augmentation (nnU-Net 2.8.1's MaskImageTransform, then RemoveLabelTransform(-1, 0)):
    preprocessing marks outside the nonzero mask `PAD_LABEL` (when a channel is normalized inside it),
    as is patch padding, and the intensity transforms have moved those voxels away from the 0 they
    hold at test time. In place, on numpy arrays or torch tensors alike (indexing only):
    ``channel_axis`` 0 for one sample (C, *spatial) / (S, *spatial), 1 for a batch (B, C, *spatial).
    """
    lead = (slice(None),) * channel_axis
    if len(masked):
        outside = seg[lead + (0,)] < 0
        for c in masked:
            data[lead + (c,)][outside] = 0
    seg[seg < 0] = 0
    return data, seg
