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


def reference_voxels(ndim: int) -> int:
    """nnU-Net's reference feature-map voxel count for a 2D or 3D U-Net."""
    return _by_ndim(ndim, REFERENCE_VOXELS_2D, REFERENCE_VOXELS_3D)


def reference_batch_size(ndim: int) -> int:
    """The batch size the reference voxel count corresponds to."""
    return _by_ndim(ndim, REFERENCE_BATCH_SIZE_2D, REFERENCE_BATCH_SIZE_3D)


def voxel_budget(ndim: int, gpu_memory_gb: float) -> float:
    """Feature-map voxels (per sample, at the reference batch size) allowed on a GPU of ``gpu_memory_gb``.

    Scales nnU-Net's reference linearly with memory, as nnU-Net's ``-gpu_memory_target`` does.
    """
    return reference_voxels(ndim) * gpu_memory_gb / REFERENCE_GPU_MEMORY_GB


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
    sizes = []
    size = [int(s) for s in patch_size]
    for stride in strides:
        size = [a // b for a, b in zip(size, stride)]
        sizes.append(size)
    total = 0
    for feats, size in zip(features_per_stage, sizes):  # encoder
        total += n_conv_per_stage * feats * int(np.prod(size, dtype=np.int64))
    n_decoder = len(strides) - 1
    for d in range(n_decoder):  # decoder, from the lowest resolution up
        stage = n_decoder - 1 - d  # the encoder stage whose skip this decoder stage merges
        voxels = int(np.prod(sizes[stage], dtype=np.int64))
        total += (n_conv_per_stage + 1) * features_per_stage[stage] * voxels
        if deep_supervision or d == n_decoder - 1:
            total += num_classes * voxels
    return total


def estimated_vram_gb(feature_map_voxels: int, batch_size: int, ndim: int) -> float:
    """Rough GPU memory (GB) one training needs: fixed overhead + activations scaled by batch size.

    The activation part is the fraction of nnU-Net's reference (``feature_map_voxels *
    batch_size`` over ``reference_voxels * reference_batch_size``) times the memory left after
    `FIXED_OVERHEAD_GB` on the 8 GB reference GPU. A plan that fills an 8 GB budget therefore
    estimates ~8 GB; a tiny 2D plan ~1 GB. Used for packing jobs on GPUs, not for planning.
    """
    fraction = feature_map_voxels * batch_size / (reference_voxels(ndim) * reference_batch_size(ndim))
    return round(FIXED_OVERHEAD_GB + (REFERENCE_GPU_MEMORY_GB - FIXED_OVERHEAD_GB) * fraction, 2)


def _by_ndim(ndim: int, two: int, three: int) -> int:
    if ndim == 2:
        return two
    if ndim == 3:
        return three
    raise ValueError(f"U-Nets are 2D or 3D, got ndim={ndim}")
