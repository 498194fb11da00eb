"""Plan transfer (`autoseg plan TARGET --from-plans SOURCE`): the source's configurations, the target's images."""

from __future__ import annotations

import dataclasses
import json

import pytest

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record
from autoseg.planning.plan import plan_dataset
from autoseg.planning.plans import Plan
from autoseg.planning.store import plan_differences, save_plan
from autoseg.planning.transfer import load_source_plan, transfer_plan
from tests.planning.conftest import make_fingerprint

TOPOLOGY = ("spacing", "patch_size", "batch_size", "strides", "kernel_sizes", "features_per_stage",
            "n_conv_per_stage", "batch_dice", "data_identifier", "previous_stage", "next_stage")


@pytest.fixture(scope="module")
def target():
    """MRI target whose coarse axis is the last one (1 x 1 x 3 mm), so its own plan would transpose."""
    return make_fingerprint([(36, 50, 35)] * 9, [(1.0, 1.0, 3.0)] * 9, channel_names={0: "T1"},
                            labels={"background": 0, "a": 1}, name="Dataset004_Target")


def test_source_configurations_with_the_target_normalisation(anisotropic_ct_fingerprint, target) -> None:
    source = plan_dataset(anisotropic_ct_fingerprint)
    plan = transfer_plan(source, target)
    assert set(plan.configurations) == set(source.configurations) >= {"2d", "3d_fullres"}
    for name, config in plan.configurations.items():
        assert {k: getattr(config, k) for k in TOPOLOGY} == {k: getattr(source.configurations[name], k)
                                                              for k in TOPOLOGY}, name
    assert (plan.transpose_forward, plan.gpu_memory_gb) == (source.transpose_forward, source.gpu_memory_gb)
    assert plan.transpose_forward != plan_dataset(target).transpose_forward  # the source's, not its own
    # the target's own images: names, labels, z-score for its MRI (the CT source clips and uses CT statistics)
    assert source.normalization[0].scheme == "ct" and plan.normalization[0].scheme == "zscore"
    assert (plan.dataset, plan.channel_names, plan.labels) == ("Dataset004_Target", {0: "T1"}, target.labels)
    assert plan.original_median_spacing == (1.0, 1.0, 3.0) and plan.transferred_from == "Dataset101_ThickCT"
    # median shapes: (36, 50, 35) voxels at 1 x 1 x 3 mm resampled to the source's 5 x 0.7 x 0.7 mm
    assert plan.configurations["3d_fullres"].median_shape == (7, 71, 150)
    assert plan.configurations["2d"].median_shape == (71, 150)
    assert plan.configurations["3d_fullres"].reasons["patch_size"].startswith("from the plans of Dataset101_ThickCT")


def test_overrides_apply_on_top_and_the_plan_round_trips(paths, anisotropic_ct_fingerprint, target) -> None:
    plan = transfer_plan(plan_dataset(anisotropic_ct_fingerprint), target, ["3d_fullres.batch_size=5"])
    assert plan.configurations["3d_fullres"].batch_size == 5 and plan.overrides == ("3d_fullres.batch_size=5",)
    file = save_plan(paths, plan)
    assert json.loads(file.read_text())["transferred_from"] == "Dataset101_ThickCT"
    assert load_record(file, Plan) == plan and plan_differences(plan, load_record(file, Plan)) == []
    assert load_source_plan(paths, str(file)) == plan  # a plans.json given by path
    assert load_source_plan(paths, "Dataset004_Target") == plan  # or by dataset name


def test_channel_count_must_match(anisotropic_ct_fingerprint) -> None:
    two = make_fingerprint([(36, 50, 35)] * 3, [(1.0, 1.0, 1.0)] * 3, channel_names={0: "T1", 1: "T2"},
                           name="Dataset007_TwoChannels")
    with pytest.raises(AutosegError, match=r"Dataset007_TwoChannels: Dataset007_TwoChannels has 2 input channels "
                                           r"but the plans of Dataset101_ThickCT are for 1 input channel"):
        transfer_plan(plan_dataset(anisotropic_ct_fingerprint), two)
    with pytest.raises(AutosegError, match="names the dataset itself"):
        transfer_plan(plan_dataset(anisotropic_ct_fingerprint), anisotropic_ct_fingerprint)


def test_missing_source_is_one_line(paths) -> None:
    with pytest.raises(AutosegError, match="plans file not found"):
        load_source_plan(paths, str(paths.preprocessed / "nope.json"))
    with pytest.raises(AutosegError, match="no plan yet; run `autoseg plan Dataset005_Source` first"):
        load_source_plan(paths, "Dataset005_Source")


def test_version_1_plans_read_as_planned_from_their_own_fingerprint(paths, hippocampus_like_fingerprint) -> None:
    plan = plan_dataset(hippocampus_like_fingerprint)
    file = save_plan(paths, plan)
    body = json.loads(file.read_text())
    del body["transferred_from"]
    body["schema_version"] = 1
    file.write_text(json.dumps(body))
    assert load_record(file, Plan) == plan and plan.transferred_from is None


def test_version_1_region_plans_load(paths, hippocampus_like_fingerprint) -> None:
    """Region-based plans were written as schema 1 (regions_class_order, no transferred_from): the one
    v1 -> v2 migration reads them with their regions kept."""
    fp = dataclasses.replace(hippocampus_like_fingerprint, labels={"background": 0, "whole": (1, 2), "posterior": 2},
                             regions_class_order=(1, 2))
    plan = plan_dataset(fp)
    file = save_plan(paths, plan)
    body = json.loads(file.read_text())
    del body["transferred_from"]
    body["schema_version"] = 1
    file.write_text(json.dumps(body))
    back = load_record(file, Plan)
    assert back == plan and back.regions_class_order == (1, 2) and back.transferred_from is None
    assert back.label_scheme.has_regions and back.num_classes == 2
    # --from-plans onto a region dataset keeps the target's regions_class_order
    source = dataclasses.replace(plan_dataset(hippocampus_like_fingerprint), dataset="Dataset005_Source")
    assert transfer_plan(source, fp).regions_class_order == (1, 2)
