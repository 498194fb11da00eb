"""The pure planning rules, pinned on small hand-computed cases and nnU-Net's published behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.common.errors import ConfigError
from autoseg.planning import rules
from tests.planning.conftest import CT_STATS, HIPPOCAMPUS_STATS


def test_target_spacing_is_the_median_for_isotropic_data() -> None:
    spacings = np.array([[1.0, 1.0, 1.0], [1.2, 0.9, 0.9], [0.8, 1.1, 1.1]])
    shapes = np.array([[36, 50, 35]] * 3)
    d = rules.target_spacing(spacings, shapes)
    assert d.value == (1.0, 1.0, 1.0)
    assert "median" in d.reason


def test_anisotropic_axis_takes_the_10th_percentile() -> None:
    # z spacings 4..13 mm over 10 cases: median 8.5, 10th percentile 4.9
    spacings = np.array([[z, 0.7, 0.7] for z in range(4, 14)], dtype=float)
    shapes = np.array([[25, 192, 192]] * 10)
    d = rules.target_spacing(spacings, shapes)
    assert d.value[0] == pytest.approx(np.percentile(np.arange(4, 14), 10))
    assert d.value[1:] == (0.7, 0.7)
    assert "anisotropic" in d.reason


def test_anisotropic_axis_is_not_lifted_below_the_next_coarsest() -> None:
    # thin-slice cases drag the 10th percentile below the in-plane spacing
    spacings = np.array([[0.5, 1.0, 1.0]] * 3 + [[5.0, 1.0, 1.0]] * 7)
    shapes = np.array([[20, 256, 256]] * 10)
    d = rules.target_spacing(spacings, shapes)
    assert d.value[0] == pytest.approx(1.0 + rules.ANISOTROPIC_SPACING_MARGIN_MM)


def test_anisotropic_spacing_with_many_voxels_keeps_the_median() -> None:
    spacings = np.array([[5.0, 0.7, 0.7]] * 5)
    shapes = np.array([[200, 192, 192]] * 5)  # not 3x fewer voxels along z
    assert rules.target_spacing(spacings, shapes).value == (5.0, 0.7, 0.7)


@pytest.mark.parametrize("spacing, forward", [((5.0, 0.7, 0.7), (0, 1, 2)), ((0.7, 0.7, 5.0), (2, 0, 1)),
                                              ((0.7, 5.0, 0.7), (1, 0, 2)), ((1.0, 1.0, 1.0), (0, 1, 2))])
def test_transpose_puts_the_coarse_axis_first_and_inverts(spacing, forward) -> None:
    (fwd, bwd) = rules.transpose_axes(spacing).value
    assert fwd == forward
    assert [fwd[b] for b in bwd] == [0, 1, 2]
    assert np.argmax([spacing[a] for a in fwd]) == 0


def test_ct_normalization_clips_to_foreground_percentiles() -> None:
    d = rules.normalization("CT", 1.0, CT_STATS)
    assert (d.value.scheme, d.value.clip_low, d.value.clip_high) == ("ct", -80.0, 310.0)
    assert (d.value.mean, d.value.std, d.value.use_nonzero_mask) == (80.0, 60.0, False)


@pytest.mark.parametrize("name, scheme", [("noNorm", "none"), ("rescale_to_0_1", "rescale_to_0_1"),
                                          ("RGB_to_0_1", "rgb_to_0_1"), ("T2", "zscore"), ("ct", "ct"),
                                          ("zscore", "zscore")])
def test_normalization_by_channel_name(name, scheme) -> None:
    assert rules.normalization(name, 1.0, HIPPOCAMPUS_STATS).value.scheme == scheme


def test_zscore_uses_the_nonzero_mask_only_when_cropping_removed_a_quarter() -> None:
    assert rules.normalization("T1", 0.6, HIPPOCAMPUS_STATS).value.use_nonzero_mask is True
    assert rules.normalization("T1", 0.75, HIPPOCAMPUS_STATS).value.use_nonzero_mask is False
    assert rules.normalization("CT", 0.6, CT_STATS).value.use_nonzero_mask is False
    assert rules.normalization("noNorm", 0.6, CT_STATS).value.use_nonzero_mask is False


def test_topology_of_thick_slice_ct_waits_with_the_coarse_axis() -> None:
    topo = rules.network_topology((5.0, 0.7, 0.7), (25, 192, 192))
    assert topo.strides[:4] == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    assert topo.kernel_sizes[:3] == ((1, 3, 3), (1, 3, 3), (3, 3, 3))
    assert topo.kernel_sizes[-1] == (3, 3, 3)
    assert topo.num_pools == (2, 5, 5)
    assert topo.patch_size == (28, 192, 192)


def test_topology_of_hippocampus() -> None:
    topo = rules.network_topology((1.0, 1.0, 1.0), (36, 50, 35))
    assert topo.num_pools == (3, 3, 3)
    assert topo.patch_size == (40, 56, 40)
    assert len(topo.kernel_sizes) == len(topo.strides) == 4


@pytest.mark.parametrize("patch", [(7, 9, 130), (64, 64, 64), (13, 200, 31), (8, 8, 8)])
def test_topology_properties(patch) -> None:
    topo = rules.network_topology((1.0, 1.0, 1.0), patch)
    assert all(p % d == 0 and p >= q for p, d, q in zip(topo.patch_size, topo.divisor, patch))
    # the bottleneck feature map (of the padded patch) is >= 4 along every pooled axis
    assert all(p // d >= rules.MIN_FEATURE_MAP_EDGE_VOX or n == 0
               for p, d, n in zip(topo.patch_size, topo.divisor, topo.num_pools))
    assert topo.strides[0] == (1, 1, 1)


def test_features_double_and_cap() -> None:
    assert rules.features_per_stage(7, 3) == (32, 64, 128, 256, 320, 320, 320)
    assert rules.features_per_stage(8, 2) == (32, 64, 128, 256, 512, 512, 512, 512)


def test_initial_patch_follows_inverse_spacing_and_the_median_shape() -> None:
    assert rules.initial_patch_size((1.0, 1.0, 1.0), (300, 400, 500)) == (256, 256, 256)
    assert rules.initial_patch_size((2.0, 1.0, 1.0), (1000, 1000, 1000)) == (161, 323, 323)
    assert rules.initial_patch_size((1.0, 1.0, 1.0), (36, 50, 35)) == (36, 50, 35)


def test_patch_shrinks_to_the_budget_and_tracks_the_median_aspect() -> None:
    big = rules.fit_patch_to_budget((1.0, 1.0, 1.0), (300, 300, 300), 2, 8.0).value
    small = rules.fit_patch_to_budget((1.0, 1.0, 1.0), (300, 300, 300), 2, 2.0).value
    assert np.prod(small.topology.patch_size) < np.prod(big.topology.patch_size)
    assert big.feature_map_voxels * rules.MIN_BATCH_SIZE <= 560e6 * 2
    assert max(big.topology.patch_size) - min(big.topology.patch_size) <= 32  # cube data, near-cube patch


def test_impossible_budget_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot fit"):
        rules.fit_patch_to_budget((1.0, 1.0, 1.0), (64, 64, 64), 2, 1e-9)


def test_batch_size_minimum_and_dataset_cap() -> None:
    assert rules.batch_size(500_000_000, (128, 128, 128), 3, 8.0, 1e12).value == 2
    capped = rules.batch_size(1_000_000, (40, 56, 40), 3, 8.0, 36 * 50 * 35 * 260)
    assert capped.value == 9 and "5%" in capped.reason
    assert rules.batch_size(1_000_000, (40, 56, 40), 3, 8.0, 1e12).value == round(560e6 / 1e6 * 2)


def test_lowres_rule_and_spacing_steps() -> None:
    assert rules.lowres_needed((128, 128, 128), (400, 512, 512)).value is True
    assert rules.lowres_needed((40, 56, 40), (36, 50, 35)).value is False
    # coarse-enough axes wait while finer ones catch up
    assert rules.next_lowres_spacing((5.0, 1.0, 1.0)) == pytest.approx((5.0, 1.03, 1.03))
    assert rules.next_lowres_spacing((1.0, 1.0, 1.0)) == pytest.approx((1.03, 1.03, 1.03))
