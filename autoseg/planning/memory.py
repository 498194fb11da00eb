"""GPU memory model of the planner: how much a U-Net's activations cost, and what fits a budget.

nnU-Net does not measure memory; it sums the voxels of every convolution output of the
U-Net (encoder and decoder, per sample) and compares that sum with a reference value
that was found, empirically, to fill an 8 GB GPU at a reference batch size. We reproduce that
model exactly (so plans match nnU-Net's) as a pure function of the topology, the number of
classes and the patch size, and derive from it a rough GB figure that the scheduler uses to
pack several trainings on one GPU.

Input channels do not enter the sum, exactly as in nnU-Net: the input tensor is tiny next to
the 32+ feature maps of the first stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

REFERENCE_GPU_MEMORY_GB = 8.0
"""GPU memory (GB) that the reference values below correspond to (nnU-Net ``UNet_reference_val_corresp_GB``)."""

REFERENCE_VOXELS_3D = 560_000_000
"""Feature-map voxels (per sample) of a 3D U-Net that fill `REFERENCE_GPU_MEMORY_GB` at batch size
`REFERENCE_BATCH_SIZE_3D` (nnU-Net v2 ``UNet_reference_val_3d``; set empirically to reproduce
nnU-Net v1's plans)."""

REFERENCE_VOXELS_2D = 85_000_000
"""Same for 2D U-Nets at batch size `REFERENCE_BATCH_SIZE_2D` (nnU-Net v2 ``UNet_reference_val_2d``)."""

REFERENCE_BATCH_SIZE_3D = 2
"""Batch size the 3D reference value was measured at (nnU-Net ``UNet_reference_val_corresp_bs_3d``)."""

REFERENCE_BATCH_SIZE_2D = 12
"""Batch size the 2D reference value was measured at (nnU-Net ``UNet_reference_val_corresp_bs_2d``)."""

FIXED_OVERHEAD_GB = 1.0
"""Rough memory (GB) a training process holds whatever the patch: CUDA context (~0.3-0.5 GB),
cuDNN workspace, weights, gradients and Adam/SGD state of a <=30 M parameter U-Net, and the
allocator's slack. Only used for `estimated_vram_gb` (scheduler packing), never for planning."""


@dataclass(frozen=True)
class MemoryReference:
    """An empirical calibration of the voxel model: these many feature-map voxels fill this GPU.

    Each network family has its own (a residual encoder holds more activations per counted
    voxel than a plain one); planners scale it linearly to the budget.
    """

    voxels_3d: int
    voxels_2d: int
    gpu_memory_gb: float
    batch_size_3d: int = REFERENCE_BATCH_SIZE_3D
    batch_size_2d: int = REFERENCE_BATCH_SIZE_2D


PLAIN_REFERENCE = MemoryReference(REFERENCE_VOXELS_3D, REFERENCE_VOXELS_2D, REFERENCE_GPU_MEMORY_GB)
"""nnU-Net's default ``ExperimentPlanner`` calibration (plain-conv U-Net, 8 GB)."""


def reference_voxels(ndim: int, ref: MemoryReference = PLAIN_REFERENCE) -> int:
    """The reference feature-map voxel count for a 2D or 3D U-Net (nnU-Net's by default)."""
    return _by_ndim(ndim, ref.voxels_2d, ref.voxels_3d)


def reference_batch_size(ndim: int, ref: MemoryReference = PLAIN_REFERENCE) -> int:
    """The batch size the reference voxel count corresponds to."""
    return _by_ndim(ndim, ref.batch_size_2d, ref.batch_size_3d)


def voxel_budget(ndim: int, gpu_memory_gb: float, ref: MemoryReference = PLAIN_REFERENCE) -> float:
    """Feature-map voxels (per sample, at the reference batch size) allowed on a GPU of ``gpu_memory_gb``.

    Scales the reference linearly with memory, as nnU-Net's ``-gpu_memory_target`` does.
    """
    return reference_voxels(ndim, ref) * gpu_memory_gb / ref.gpu_memory_gb


def conv_feature_map_voxels(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                            features_per_stage: Sequence[int], num_classes: int,
                            n_conv_per_stage: int = 2, deep_supervision: bool = False) -> int:
    """Sum of the output voxels (channels x spatial) of every conv of a plain U-Net, one sample.

    The same count as ``dynamic_network_architectures``' ``PlainConvUNet.compute_conv_feature_map_size``
    (which nnU-Net's planner uses): encoder stage ``s`` runs ``n_conv_per_stage`` convs with
    ``features_per_stage[s]`` outputs at its strided size (sizes floor-divide by each stride);
    each decoder stage (all but the bottleneck, at the size of its skip) adds a transposed conv
    and ``n_conv_per_stage`` convs, both with the skip's features; the segmentation head adds
    ``num_classes`` maps at full resolution (on every decoder stage with deep supervision;
    nnU-Net plans without it).
    """
    if len(strides) != len(features_per_stage):
        raise ValueError(f"{len(strides)} strides but {len(features_per_stage)} feature counts")
    sizes = _stage_sizes(patch_size, strides)
    total = sum(n_conv_per_stage * f * int(np.prod(s, dtype=np.int64)) for f, s in zip(features_per_stage, sizes))
    return total + _decoder_voxels(sizes, features_per_stage, num_classes, n_conv_per_stage, deep_supervision)


def _decoder_voxels(sizes: Sequence[Sequence[int]], features_per_stage: Sequence[int], num_classes: int,
                    n_conv_per_stage: int, deep_supervision: bool) -> int:
    """Each decoder stage (at the size of its skip): a transposed conv and ``n_conv_per_stage`` convs
    with the skip's features, plus the head's ``num_classes`` maps (last stage only without deep supervision)."""
    total = 0
    n_decoder = len(sizes) - 1
    for d in range(n_decoder):  # decoder, from the lowest resolution up
        stage = n_decoder - 1 - d  # the encoder stage whose skip this decoder stage merges
        voxels = int(np.prod(sizes[stage], dtype=np.int64))
        total += (n_conv_per_stage + 1) * features_per_stage[stage] * voxels
        if deep_supervision or d == n_decoder - 1:
            total += num_classes * voxels
    return total


def residual_feature_map_voxels(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                                features_per_stage: Sequence[int], num_classes: int,
                                blocks_per_stage: Sequence[int], n_conv_decoder: int = 1) -> int:
    """Sum of the output voxels of every conv of a residual-encoder U-Net, one sample.

    The count of ``dynamic_network_architectures``' ``ResidualEncoderUNet.compute_conv_feature_map_size``
    (what nnU-Net's ResEnc planners budget): a stem conv with ``features_per_stage[0]`` maps at
    full size; encoder stage ``s`` has ``blocks_per_stage[s]`` basic blocks of two convs at its
    strided size, the first block adding a 1x1 projection on its skip path when it strides or
    changes width; the decoder is the plain one with ``n_conv_decoder`` convs per stage.
    """
    if not len(strides) == len(features_per_stage) == len(blocks_per_stage):
        raise ValueError(f"{len(strides)} strides, {len(features_per_stage)} feature counts and "
                         f"{len(blocks_per_stage)} block counts")
    size = [int(s) for s in patch_size]
    total = int(features_per_stage[0]) * int(np.prod(size, dtype=np.int64))  # stem
    in_feats = int(features_per_stage[0])
    for stride, feats, blocks in zip(strides, features_per_stage, blocks_per_stage):
        after = [a // b for a, b in zip(size, stride)]
        voxels = int(feats) * int(np.prod(after, dtype=np.int64))
        projection = in_feats != feats or after != size
        total += (2 * int(blocks) + int(projection)) * voxels
        size, in_feats = after, int(feats)
    sizes = _stage_sizes(patch_size, strides)
    return total + _decoder_voxels(sizes, features_per_stage, num_classes, n_conv_decoder, False)


def _stage_sizes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[list[int]]:
    sizes, size = [], [int(s) for s in patch_size]
    for stride in strides:
        size = [a // b for a, b in zip(size, stride)]
        sizes.append(size)
    return sizes


def estimated_vram_gb(feature_map_voxels: int, batch_size: int, ndim: int,
                      ref: MemoryReference = PLAIN_REFERENCE) -> float:
    """Rough GPU memory (GB) one training needs: fixed overhead + activations scaled by batch size.

    The activation part is the fraction of nnU-Net's reference (``feature_map_voxels *
    batch_size`` over ``reference_voxels * reference_batch_size``) times the memory left after
    `FIXED_OVERHEAD_GB` on the 8 GB reference GPU. A plan that fills an 8 GB budget therefore
    estimates ~8 GB; a tiny 2D plan ~1 GB. Used for packing jobs on GPUs, not for planning.
    """
    fraction = feature_map_voxels * batch_size / (reference_voxels(ndim, ref) * reference_batch_size(ndim, ref))
    return round(FIXED_OVERHEAD_GB + (ref.gpu_memory_gb - FIXED_OVERHEAD_GB) * fraction, 2)


def _by_ndim(ndim: int, two: int, three: int) -> int:
    if ndim == 2:
        return two
    if ndim == 3:
        return three
    raise ValueError(f"U-Nets are 2D or 3D, got ndim={ndim}")
