"""The median shape stays fractional into the patch (nnU-Net 2.8.1's planner does).

With an even number of cases the median of the resampled shapes can be ``k + 0.5``. nnU-Net
clips its initial patch to that fractional median and pads it up to what the poolings need, so
a median of 80.5 with 4 poolings becomes 96 (80 would stay 80). The differential test runs
nnunetv2's own planner code on the same synthetic fingerprints, with its file access replaced.
"""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.planning import rules
from autoseg.planning.plan import plan_dataset
from tests.planning.conftest import make_fingerprint


def test_fractional_median_is_padded_up_like_nnunet() -> None:
    initial = rules.initial_patch_size((1.0, 1.0, 1.0), (80.5, 80.5, 80.5))
    assert initial == (80.5, 80.5, 80.5)
    topo = rules.network_topology((1.0, 1.0, 1.0), initial)
    assert topo.num_pools == (4, 4, 4)
    assert topo.patch_size == (96, 96, 96)
    # an integral median (odd number of cases) is unchanged: 80 is already a multiple of 16
    assert rules.network_topology((1.0, 1.0, 1.0), rules.initial_patch_size((1.0,) * 3, (80, 80, 80))).patch_size \
        == (80, 80, 80)


def test_fractional_median_can_add_a_pooling() -> None:
    """14.5 halves to 8 (ceil of 7.25), which may be pooled once more; 14 halves to 7, which may not."""
    assert rules.network_topology((1.0, 1.0), (14.5, 64)).num_pools[0] == 2
    assert rules.network_topology((1.0, 1.0), (14, 64)).num_pools[0] == 1


@pytest.mark.parametrize("shapes, patch", [
    ([(80, 80, 80), (81, 81, 81)], (96, 96, 96)),  # even count: median 80.5
    ([(80, 80, 80), (80, 80, 80), (81, 81, 81)], (80, 80, 80)),  # odd count: median 80
])
def test_plan_uses_the_fractional_median(shapes, patch) -> None:
    plan = plan_dataset(make_fingerprint(shapes, [(1.0, 1.0, 1.0)] * len(shapes)))
    full = plan.configuration("3d_fullres")
    assert full.patch_size == patch
    assert full.median_shape == tuple(round(float(m)) for m in np.median(shapes, axis=0))


# --------------------------------------------------------------------------- against nnunetv2

SHAPE_SETS = {  # even numbers of cases, so medians of k + 0.5 along some axes
    "cube_80.5": ([(80, 80, 80), (81, 81, 81)], [(1.0, 1.0, 1.0)] * 2),
    "hippocampus_like": ([(36, 50, 35), (37, 51, 35), (35, 50, 36), (37, 49, 34)], [(1.0, 1.0, 1.0)] * 4),
    "thin_axis_14.5": ([(14, 100, 120), (15, 101, 121), (14, 99, 118), (15, 102, 123)], [(1.0, 1.0, 1.0)] * 4),
    "thick_slice_ct": ([(25, 192, 192), (26, 193, 191), (24, 190, 195), (27, 201, 187)], [(5.0, 0.7, 0.7)] * 4),
    "mixed_spacing": ([(60, 90, 91), (61, 88, 90)], [(1.5, 1.0, 1.0), (1.5, 1.2, 1.0)]),
}


def _nnunet_planner(monkeypatch: pytest.MonkeyPatch, tmp_path, shapes, spacings, labels):
    """nnunetv2's ExperimentPlanner built by its own ``__init__`` on an in-memory dataset (no file is read)."""
    pytest.importorskip("nnunetv2", reason="nnunetv2 (the parity reference) is not installed; see README")
    import nnunetv2.experiment_planning.experiment_planners.default_experiment_planner as dep

    dataset_json = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": len(shapes),
                    "file_ending": ".nii.gz"}
    fingerprint = {"spacings": [list(s) for s in spacings], "shapes_after_crop": [list(s) for s in shapes],
                   "median_relative_size_after_cropping": 1.0}
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setattr(dep, "maybe_convert_to_dataset_name", lambda _: "Dataset100_Test")
    monkeypatch.setattr(dep, "load_json", lambda p: dataset_json if p.endswith("dataset.json") else fingerprint)
    monkeypatch.setattr(dep, "get_filenames_of_train_images_and_targets", lambda *_: {})
    monkeypatch.setattr(dep, "isfile", lambda p: p.endswith("dataset_fingerprint.json"))
    return dep, dep.ExperimentPlanner("Dataset100_Test", gpu_memory_target_in_gb=8)


@pytest.mark.parametrize("name", SHAPE_SETS)
def test_patch_and_batch_match_nnunet_on_even_case_counts(name: str, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path) -> None:
    shapes, spacings = SHAPE_SETS[name]
    labels = {"background": 0, "Anterior": 1, "Posterior": 2}
    dep, planner = _nnunet_planner(monkeypatch, tmp_path, shapes, spacings, labels)
    # the steps of nnU-Net's plan_experiment up to its 3d_fullres and 2d configurations
    forward, _ = planner.determine_transpose()
    target = planner.determine_fullres_target_spacing()
    median = np.median([dep.compute_new_shape(sh, sp, target) for sp, sh in zip(spacings, shapes)], 0)[forward]
    assert len(shapes) % 2 == 0 and np.any(median % 1)  # the case this test is about
    n_voxels = float(np.prod(median, dtype=np.float64) * len(shapes))
    ref_3d = planner.get_plans_for_configuration(target[forward], median, "3d", n_voxels, {})
    ref_2d = planner.get_plans_for_configuration(target[forward][1:], median[1:], "2d", n_voxels, {})

    plan = plan_dataset(make_fingerprint(shapes, spacings, labels=labels))
    for cfg, ref in ((plan.configuration("3d_fullres"), ref_3d), (plan.configuration("2d"), ref_2d)):
        arch = ref["architecture"]["arch_kwargs"]
        assert cfg.patch_size == tuple(int(p) for p in ref["patch_size"]), cfg.name
        assert cfg.strides == tuple(tuple(s) for s in arch["strides"]), cfg.name
        assert cfg.kernel_sizes == tuple(tuple(k) for k in arch["kernel_sizes"]), cfg.name
        assert cfg.batch_size == ref["batch_size"], cfg.name


@pytest.mark.parametrize("spacing, patch", [
    ((1.0, 1.0, 1.0), (80.5, 80.5, 80.5)), ((1.0, 1.0, 1.0), (14.5, 100.5, 120.0)),
    ((5.0, 0.7, 0.7), (25.5, 192.5, 191.5)), ((1.5, 1.0, 1.0), (60.5, 89.0, 90.5)), ((1.0, 1.0), (16.5, 47.5)),
])
def test_topology_of_a_fractional_patch_is_nnunets(spacing, patch) -> None:
    """`network_topology` against nnunetv2's ``get_pool_and_conv_props`` (a pure function) on k + 0.5 sizes."""
    pytest.importorskip("nnunetv2", reason="nnunetv2 (the parity reference) is not installed; see README")
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    pools, strides, kernels, padded, _ = get_pool_and_conv_props(spacing, np.array(patch), 4, 999999)
    topo = rules.network_topology(spacing, patch)
    assert topo.num_pools == tuple(pools)
    assert topo.strides == strides and topo.kernel_sizes == kernels
    assert topo.patch_size == tuple(int(p) for p in padded)
