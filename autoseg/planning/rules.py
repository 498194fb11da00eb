"""The planning rules: pure functions of the fingerprint, each returning its value and its reason.

These follow nnU-Net v2's ``ExperimentPlanner`` (``default_experiment_planner.py``) and
``get_pool_and_conv_props`` (``network_topology.py``) so that a user coming from nnU-Net gets
the same plans. Every number is a named constant below with its source. Nothing here reads a
file or the environment; `autoseg.planning.plan` composes the rules into a `Plan`.

Conventions: spacings in mm and shapes in voxels, both in array order; before `transpose_axes`
that is (z, y, x), after it the coarse axis comes first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from autoseg.common.errors import ConfigError
from autoseg.fingerprint import IntensityStats
from autoseg.planning import memory
from autoseg.planning.plans import ChannelNormalization
from autoseg.planning.presets import DEFAULT_PRESET, PRESETS, Preset

T = TypeVar("T")

ANISOTROPY_RATIO = 3.0
"""An axis is anisotropic when its median spacing is > 3x the next coarsest one and its median
size is 3x smaller than the others (nnU-Net ``ANISO_THRESHOLD``)."""

ANISOTROPIC_SPACING_PERCENTILE = 10.0
"""On an anisotropic axis the target spacing is this percentile of the case spacings, not the
median: fewer cases get upsampled across their thick slices (nnU-Net's fullres target spacing)."""

ANISOTROPIC_SPACING_MARGIN_MM = 1e-5
"""Added when the 10th percentile falls below the next coarsest axis and is lifted to it, so
the coarse axis stays strictly the coarsest (nnU-Net adds the same 1e-5)."""

NONZERO_MASK_MAX_RELATIVE_SIZE = 0.75
"""Z-score inside the nonzero mask when cropping to nonzero removed more than a quarter of the
median volume (median relative size after crop < 3/4): the zero background is then no image
content (skull-stripped MRI, for example) and must not bias the statistics (nnU-Net)."""

MIN_FEATURE_MAP_EDGE_VOX = 4
"""An axis is pooled only while its feature map stays >= 4 voxels, i.e. is >= 8 before pooling
(nnU-Net ``UNet_featuremap_min_edge_length``)."""

SINGLE_AXIS_MIN_EDGE_VOX = 3 * MIN_FEATURE_MAP_EDGE_VOX
"""When only one axis is still poolable it must be >= 12 voxels, else pooling stops
(nnU-Net ``get_pool_and_conv_props``)."""

POOL_SPACING_RATIO = 2.0
"""An axis is pooled (and gets 3-wide kernels) only when its current spacing is < 2x the finest
one; coarser axes wait until pooling the others has caught up (nnU-Net ``get_pool_and_conv_props``)."""

BASE_FEATURES = 32
"""Feature maps of the first stage, doubled at every stage (nnU-Net ``UNet_base_num_features``)."""

MAX_FEATURES_3D = 320
"""Feature cap of 3D U-Nets (nnU-Net ``UNet_max_features_3d``)."""

MAX_FEATURES_2D = 512
"""Feature cap of 2D U-Nets (nnU-Net ``UNet_max_features_2d``)."""

INITIAL_PATCH_EDGE_3D_VOX = 256
"""A 3D patch starts with the volume of a 256^3 cube, in the aspect of 1 / spacing (nnU-Net)."""

INITIAL_PATCH_EDGE_2D_VOX = 2048
"""A 2D patch starts with the area of a 2048^2 square, in the aspect of 1 / spacing (nnU-Net)."""

MIN_BATCH_SIZE = 2
"""Batch size is never below 2, even if the patch must shrink for it (nnU-Net ``UNet_min_batch_size``)."""

LOWRES_MIN_PATCH_COVERAGE = 0.25
"""3d_lowres is planned when the 3d_fullres patch covers < 25 % of the median image's voxels
(nnU-Net ``lowres_creation_threshold``)."""

LOWRES_SPACING_STEP = 1.03
"""3d_lowres spacing grows in steps of 3 % until its patch covers 25 % of the median image
(nnU-Net ``spacing_increase_factor``)."""

LOWRES_MIN_VOXEL_RATIO = 2.0
"""3d_lowres is dropped when its median image is not at least 2x smaller than fullres'
(nnU-Net: the cascade would gain nothing)."""

NORMALIZATION_BY_CHANNEL_NAME = {
    "ct": "ct",
    "nonorm": "none",
    "zscore": "zscore",
    "rescale_to_0_1": "rescale_to_0_1",
    "rgb_to_0_1": "rgb_to_0_1",
}
"""Channel name (lower-cased) -> normalization scheme; any other name means z-score
(nnU-Net ``map_channel_name_to_normalization``)."""

SCHEMES_USING_NONZERO_MASK = ("zscore",)
"""Schemes that honour the nonzero mask (nnU-Net: ``leaves_pixels_outside_mask_at_zero...``)."""


@dataclass(frozen=True)
class Decision(Generic[T]):
    """A planned value and the human-readable reason `autoseg plan` prints for it."""

    value: T
    reason: str


@dataclass(frozen=True)
class Topology:
    """A U-Net's downsampling layout for a patch, per stage (stage 0 has stride 1)."""

    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]
    """The patch rounded up to a multiple of `divisor` per axis."""

    @property
    def num_pools(self) -> tuple[int, ...]:
        return tuple(sum(1 for s in self.strides if s[a] == 2) for a in range(len(self.patch_size)))

    @property
    def divisor(self) -> tuple[int, ...]:
        """Each patch axis must be a multiple of this (2 ** pools along it)."""
        return tuple(2 ** p for p in self.num_pools)


def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in values)


# --------------------------------------------------------------------------- dataset level


def target_spacing(spacings: np.ndarray, shapes_after_crop: np.ndarray) -> Decision[tuple[float, ...]]:
    """Median spacing per axis; on an anisotropic axis the 10th percentile instead.

    An axis is anisotropic when its median spacing is > `ANISOTROPY_RATIO` x the next coarsest
    AND its median size x `ANISOTROPY_RATIO` is below the others' (thick slices, few of them).
    There the median would upsample half the cases across thick slices (interpolation
    artefacts); the 10th percentile keeps more of them near native, lifted to at least the
    next coarsest spacing. ``spacings``/``shapes_after_crop`` are (n_cases, 3), (z, y, x).
    """
    spacings = np.asarray(spacings, dtype=float)
    target = np.percentile(spacings, 50, axis=0)
    median_size = np.percentile(np.asarray(shapes_after_crop, dtype=float), 50, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != coarse]
    next_coarsest = max(target[a] for a in others)
    aniso_spacing = target[coarse] > ANISOTROPY_RATIO * next_coarsest
    aniso_voxels = median_size[coarse] * ANISOTROPY_RATIO < min(median_size[a] for a in others)
    if not (aniso_spacing and aniso_voxels):
        why = "median spacing of the training cases"
        if aniso_spacing:
            why += (f" (axis {coarse} is > {ANISOTROPY_RATIO:g}x coarser, but has enough voxels, so "
                    "the median is kept)")
        return Decision(tuple(float(v) for v in target), why)
    value = float(np.percentile(spacings[:, coarse], ANISOTROPIC_SPACING_PERCENTILE))
    if value < next_coarsest:
        value = max(next_coarsest, value) + ANISOTROPIC_SPACING_MARGIN_MM
    target[coarse] = value
    return Decision(tuple(float(v) for v in target),
                    f"median spacing, except axis {coarse}: anisotropic (> {ANISOTROPY_RATIO:g}x coarser "
                    f"and {ANISOTROPY_RATIO:g}x fewer voxels), so its {ANISOTROPIC_SPACING_PERCENTILE:g}th "
                    f"percentile {value:g} mm instead of the median to avoid upsampling thick slices")


def transpose_axes(spacing: Sequence[float]) -> Decision[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Put the coarsest axis first (2D configurations then slice along it); returns (forward, backward)."""
    coarse = int(np.argmax(spacing))
    forward = (coarse, *[a for a in range(3) if a != coarse])
    backward = tuple(int(np.flatnonzero(np.array(forward) == a)[0]) for a in range(3))
    if forward == (0, 1, 2):
        why = "axis 0 is already the coarsest (or all are equal): no transpose"
    else:
        why = f"axis {coarse} has the coarsest spacing ({spacing[coarse]:g} mm): moved first"
    return Decision((forward, backward), why)  # type: ignore[arg-type]


def normalization(channel_name: str, median_relative_size_after_crop: float,
                  stats: IntensityStats) -> Decision[ChannelNormalization]:
    """The scheme for one channel, from its name (nnU-Net's mapping), with its parameters.

    CT: clip to the dataset's foreground 0.5/99.5 percentiles, then the foreground mean/std
    (Hounsfield units mean the same in every image). ``noNorm``, ``rescale_to_0_1`` and
    ``rgb_to_0_1`` as named. Anything else: per-image z-score, inside the nonzero mask when
    cropping removed more than a quarter of the volume (`NONZERO_MASK_MAX_RELATIVE_SIZE`).
    """
    scheme = NORMALIZATION_BY_CHANNEL_NAME.get(channel_name.strip().lower(), "zscore")
    mask = (scheme in SCHEMES_USING_NONZERO_MASK
            and median_relative_size_after_crop < NONZERO_MASK_MAX_RELATIVE_SIZE)
    if scheme == "ct":
        return Decision(
            ChannelNormalization("ct", False, stats.percentile_00_5, stats.percentile_99_5, stats.mean, stats.std),
            f"channel {channel_name!r} is CT: clip to foreground [{stats.percentile_00_5:g}, "
            f"{stats.percentile_99_5:g}] then (x - {stats.mean:.4g}) / {stats.std:.4g}")
    if scheme != "zscore":
        return Decision(ChannelNormalization(scheme), f"channel {channel_name!r} asks for {scheme}")
    where = (f"inside the nonzero mask (cropping kept a median {median_relative_size_after_crop:.0%} of the "
             f"volume < {NONZERO_MASK_MAX_RELATIVE_SIZE:.0%})" if mask else "over the whole image")
    return Decision(ChannelNormalization("zscore", use_nonzero_mask=mask),
                    f"channel {channel_name!r} is not CT: per-image z-score {where}")


def resampled_shapes(spacings: np.ndarray, shapes: np.ndarray, target: Sequence[float]) -> np.ndarray:
    """Each case's shape after crop, resampled to ``target`` spacing (rounded, like nnU-Net's ``compute_new_shape``)."""
    spacings = np.asarray(spacings, dtype=float)
    return np.round(np.asarray(shapes, dtype=float) * spacings / np.asarray(target, dtype=float)).astype(int)


# --------------------------------------------------------------------------- topology


def features_per_stage(num_stages: int, ndim: int) -> tuple[int, ...]:
    """`BASE_FEATURES` doubling per stage, capped at 320 (3D) / 512 (2D)."""
    cap = MAX_FEATURES_3D if ndim == 3 else MAX_FEATURES_2D
    return tuple(min(cap, BASE_FEATURES * 2 ** s) for s in range(num_stages))


def network_topology(spacing: Sequence[float], patch_size: Sequence[float]) -> Topology:
    """Strides and kernels of a U-Net for this patch and spacing (nnU-Net ``get_pool_and_conv_props``).

    Each stage halves every axis that (a) is >= 2 x `MIN_FEATURE_MAP_EDGE_VOX` voxels and (b) has
    a spacing < `POOL_SPACING_RATIO` x the finest poolable one; a lone poolable axis must be >=
    `SINGLE_AXIS_MIN_EDGE_VOX`. Kernels are 1 along an axis until its spacing comes within 2x of
    the finest (3 from then on), so thick slices are not mixed before the in-plane resolution
    has caught up. The bottleneck adds a 3-wide stage. The patch is rounded up to a multiple of
    2 ** pools per axis; a fractional patch (the initial one, clipped to a k + 0.5 median) is
    halved and rounded up as it is, never truncated first. (nnU-Net compares kernels against a
    list of the size-poolable axes only, indexed by axis; we compare each axis' own spacing,
    which agrees whenever the two lists coincide, i.e. on all common datasets.)
    """
    ndim = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [float(s) for s in patch_size]
    kernel = [1] * ndim
    strides: list[tuple[int, ...]] = [(1,) * ndim]
    kernels: list[tuple[int, ...]] = []
    pools = [0] * ndim
    while True:
        poolable = [a for a in range(ndim) if cur_size[a] >= 2 * MIN_FEATURE_MAP_EDGE_VOX]
        if not poolable:
            break
        finest = min(cur_spacing[a] for a in poolable)
        poolable = [a for a in poolable if cur_spacing[a] / finest < POOL_SPACING_RATIO]
        if len(poolable) == 1 and cur_size[poolable[0]] < SINGLE_AXIS_MIN_EDGE_VOX:
            break
        finest_all = min(cur_spacing)
        for a in range(ndim):
            if kernel[a] == 1 and cur_spacing[a] / finest_all < POOL_SPACING_RATIO:
                kernel[a] = 3
        stride = tuple(2 if a in poolable else 1 for a in range(ndim))
        for a in poolable:
            pools[a] += 1
            cur_spacing[a] *= 2
            cur_size[a] = float(np.ceil(cur_size[a] / 2))
        strides.append(stride)
        kernels.append(tuple(kernel))
    kernels.append((3,) * ndim)
    divisor = [2 ** p for p in pools]
    padded = tuple(int(np.ceil(float(s) / d) * d) for s, d in zip(patch_size, divisor))
    return Topology(strides=tuple(strides), kernel_sizes=tuple(kernels), patch_size=padded)


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[float]) -> tuple[float, ...]:
    """A patch of 256^3 (3D) / 2048^2 (2D) voxels in the aspect of 1 / spacing, clipped to the median shape.

    Equal physical extent per axis, larger than any GPU budget allows; the budget loop shrinks it.
    The clip keeps a fractional median (k + 0.5 from an even number of cases) as it is, like
    nnU-Net: `network_topology` then pads it up, so a median of 80.5 with 4 poolings gives 96.
    """
    inv = 1.0 / np.asarray(spacing, dtype=float)
    edge = INITIAL_PATCH_EDGE_3D_VOX if len(spacing) == 3 else INITIAL_PATCH_EDGE_2D_VOX
    scale = (edge ** len(spacing) / np.prod(inv)) ** (1 / len(spacing))
    return tuple(min(float(round(v)), float(m)) for v, m in zip(inv * scale, median_shape))


@dataclass(frozen=True)
class PatchFit:
    """The outcome of fitting a patch to the memory budget."""

    topology: Topology
    feature_map_voxels: int
    shrink_steps: int


def fit_patch_to_budget(spacing: Sequence[float], median_shape: Sequence[float], num_classes: int,
                        gpu_memory_gb: float, preset: Preset | None = None) -> Decision[PatchFit]:
    """Shrink the initial patch until a batch of `MIN_BATCH_SIZE` fits the memory budget.

    Each step takes the axis with the largest patch / median-shape ratio (the one most out of
    the data's aspect) down by one divisibility step (recomputed for the smaller patch, so no
    valid size is skipped), then re-derives the topology (nnU-Net's planning loop). The
    ``preset`` gives the network whose memory is counted and its calibration; ResEnc presets
    shrink until the reference batch fits (nnU-Net's ResEnc planners).
    """
    preset = preset or PRESETS[DEFAULT_PRESET]
    ndim = len(spacing)
    ref_bs = memory.reference_batch_size(ndim, preset.reference)
    budget = memory.voxel_budget(ndim, gpu_memory_gb, preset.reference) * ref_bs
    fit_bs = ref_bs if preset.shrink_to_reference_batch else MIN_BATCH_SIZE
    topo = network_topology(spacing, initial_patch_size(spacing, median_shape))
    start = topo.patch_size
    voxels = _voxels(topo, num_classes, preset)
    steps = 0
    while voxels * fit_bs > budget:
        patch = list(topo.patch_size)
        ratios = [p / m for p, m in zip(patch, median_shape)]
        axis = max(a for a in range(ndim) if ratios[a] == max(ratios))  # last of ties, like nnU-Net
        smaller = list(patch)
        smaller[axis] -= topo.divisor[axis]
        patch[axis] -= network_topology(spacing, smaller).divisor[axis] if smaller[axis] > 0 else 1
        if patch[axis] < 1:
            raise ConfigError(f"a GPU memory budget of {gpu_memory_gb:g} GB cannot fit a batch of "
                              f"{fit_bs} even for the smallest patch", "--gpu-memory")
        topo = network_topology(spacing, patch)
        voxels = _voxels(topo, num_classes, preset)
        steps += 1
    if steps:
        why = (f"started at {_fmt(start)} (256^3/2048^2 voxels in the 1/spacing aspect, clipped to the median "
               f"shape); shrunk {steps} step(s), largest patch/median axis first, until a batch of "
               f"{fit_bs} fits {gpu_memory_gb:g} GB")
    else:
        why = (f"the median shape {_fmt(np.round(median_shape, 1))} rounded up to a multiple of "
               f"{_fmt(topo.divisor)} (2^pools): it fits {gpu_memory_gb:g} GB whole")
    return Decision(PatchFit(topo, voxels, steps), why)


def _voxels(topo: Topology, num_classes: int, preset: Preset) -> int:
    feats = features_per_stage(len(topo.strides), len(topo.patch_size))
    return preset.feature_map_voxels(topo.patch_size, topo.strides, feats, num_classes)


def batch_size(feature_map_voxels: int, patch_size: Sequence[int], ndim: int, gpu_memory_gb: float,
               dataset_voxels: float, preset: Preset | None = None) -> Decision[int]:
    """As many samples as the budget allows, at most 5 % of the dataset's voxels, at least 2.

    Budget: the preset's reference batch (2 in 3D, 12 in 2D) scaled by reference voxels / this
    network's voxels. The 5 % cap (`presets.MAX_DATASET_FRACTION_PER_BATCH`; the ResEnc presets lift
    it to 100 %) keeps small datasets from being seen whole in a few steps.
    """
    preset = preset or PRESETS[DEFAULT_PRESET]
    ref_bs = memory.reference_batch_size(ndim, preset.reference)
    fraction = preset.max_dataset_fraction_per_batch
    by_memory = round(memory.voxel_budget(ndim, gpu_memory_gb, preset.reference) / feature_map_voxels * ref_bs)
    by_dataset = round(dataset_voxels * fraction / float(np.prod(patch_size, dtype=np.float64)))
    value = max(min(by_memory, by_dataset), MIN_BATCH_SIZE)
    if value == MIN_BATCH_SIZE and min(by_memory, by_dataset) < MIN_BATCH_SIZE:
        why = f"the minimum of {MIN_BATCH_SIZE} (memory allows {by_memory}, {fraction:.0%} of the dataset {by_dataset})"
    elif by_dataset < by_memory:
        why = (f"capped so a batch covers at most {fraction:.0%} of the dataset's "
               f"voxels ({gpu_memory_gb:g} GB would allow {by_memory})")
    else:
        why = f"what fits {gpu_memory_gb:g} GB (reference batch {ref_bs} scaled by memory)"
    return Decision(int(value), why)


def lowres_needed(patch_size: Sequence[int], median_shape: Sequence[float]) -> Decision[bool]:
    """3d_lowres is needed when the fullres patch covers < 25 % of the median image."""
    coverage = float(np.prod(patch_size, dtype=np.float64) / np.prod(median_shape, dtype=np.float64))
    if coverage < LOWRES_MIN_PATCH_COVERAGE:
        return Decision(True, f"the 3d_fullres patch covers {coverage:.0%} of the median image "
                              f"(< {LOWRES_MIN_PATCH_COVERAGE:.0%}): a low-resolution stage sees more context")
    return Decision(False, f"the 3d_fullres patch covers {min(coverage, 1.0):.0%} of the median image "
                           f"(>= {LOWRES_MIN_PATCH_COVERAGE:.0%}): no 3d_lowres needed")


def next_lowres_spacing(spacing: Sequence[float]) -> tuple[float, ...]:
    """One 3 % coarsening step: only the axes > 2x finer than the coarsest while there are any, else all."""
    spacing = np.asarray(spacing, dtype=float)
    fine = spacing.max() / spacing > POOL_SPACING_RATIO
    if fine.any():
        spacing = np.where(fine, spacing * LOWRES_SPACING_STEP, spacing)
    else:
        spacing = spacing * LOWRES_SPACING_STEP
    return tuple(float(v) for v in spacing)
