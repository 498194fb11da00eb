"""The memory model: nnU-Net's feature-map voxel count, budget scaling and the packing estimate."""

from __future__ import annotations

import pytest

from autoseg.planning import memory


def test_feature_map_voxels_by_hand() -> None:
    # 2D, patch 8x8, two stages (32, 64), 3 classes:
    #   encoder: 2 convs x 32 x 8x8 + 2 convs x 64 x 4x4 = 4096 + 2048
    #   decoder: (transposed conv + 2 convs) x 32 x 8x8 = 6144, head: 3 x 8x8 = 192
    voxels = memory.conv_feature_map_voxels((8, 8), ((1, 1), (2, 2)), (32, 64), num_classes=3)
    assert voxels == 4096 + 2048 + 6144 + 192


def test_deep_supervision_adds_a_head_per_decoder_stage() -> None:
    args = ((16, 16, 16), ((1, 1, 1), (2, 2, 2), (2, 2, 2)), (32, 64, 128))
    plain = memory.conv_feature_map_voxels(*args, num_classes=4)
    deep = memory.conv_feature_map_voxels(*args, num_classes=4, deep_supervision=True)
    assert deep - plain == 4 * 8 ** 3  # the head at the half-resolution stage


def test_sizes_floor_divide_like_the_network() -> None:
    odd = memory.conv_feature_map_voxels((9, 9), ((1, 1), (2, 2)), (32, 64), num_classes=2)
    assert odd == 2 * 32 * 81 + 2 * 64 * 16 + 3 * 32 * 81 + 2 * 81


def test_budget_scales_linearly_with_gpu_memory() -> None:
    assert memory.voxel_budget(3, 8.0) == memory.REFERENCE_VOXELS_3D
    assert memory.voxel_budget(3, 80.0) == pytest.approx(10 * memory.REFERENCE_VOXELS_3D)
    assert memory.voxel_budget(2, 4.0) == pytest.approx(memory.REFERENCE_VOXELS_2D / 2)


def test_vram_estimate_spans_overhead_to_reference() -> None:
    full = memory.estimated_vram_gb(memory.REFERENCE_VOXELS_3D, memory.REFERENCE_BATCH_SIZE_3D, 3)
    assert full == pytest.approx(memory.REFERENCE_GPU_MEMORY_GB)
    tiny = memory.estimated_vram_gb(1000, 2, 2)
    assert tiny == pytest.approx(memory.FIXED_OVERHEAD_GB, abs=0.01)
    assert memory.estimated_vram_gb(10_000_000, 4, 3) > memory.estimated_vram_gb(10_000_000, 2, 3)


def test_mismatched_topology_is_rejected() -> None:
    with pytest.raises(ValueError):
        memory.conv_feature_map_voxels((8, 8), ((1, 1), (2, 2)), (32,), num_classes=2)
