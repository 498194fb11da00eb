"""Cascade grids: the lowres export and a mask in the input geometry land exactly on the fullres preprocessed grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoseg.common.paths import Paths
from autoseg.dataset.io import read_case, read_image
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.infer.cascade import PreviousStage, export_for_next_stage, next_stages, seg_to_preprocessed_grid
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.preprocess import preprocess_case

DATASET = "Dataset999_Phantom"


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory):
    paths = Paths.under(tmp_path_factory.mktemp("cascade_grid"))
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=3, num_test=0, shape=(12, 40, 40), shape_jitter=4))
    plan = plan_and_save(paths, DATASET, PlanRequest(configs=("3d_cascade_fullres",), progress_bar=False)).plan
    case = sorted((paths.raw / DATASET / "imagesTr").iterdir())[1]
    data, geometry = read_case([case])
    seg, _ = read_image(paths.raw / DATASET / "labelsTr" / case.name.replace("_0000", ""))
    return plan, data, geometry, np.asarray(seg)


def test_export_lands_on_the_next_stage_grid(planned) -> None:
    plan, data, geometry, seg = planned
    low, cascade = plan.configuration("3d_lowres"), plan.configuration("3d_cascade_fullres")
    assert next_stages(plan, "3d_lowres") == [cascade] and next_stages(plan, "3d_cascade_fullres") == []
    low_data, low_seg, low_props, _ = preprocess_case(data, geometry, seg, plan, low)
    full_data, full_seg, _, _ = preprocess_case(data, geometry, seg, plan, cascade)
    assert low_data.shape[1:] != full_data.shape[1:]
    # perfect lowres probabilities: the export is the truth on the fullres grid, up to resampling at the borders
    probs = np.stack([low_seg[0] == k for k in range(plan.num_classes)]).astype(np.float32)
    export = export_for_next_stage(probs, low_props, plan, cascade)
    assert export.shape == full_seg.shape and export.dtype == np.int8
    agree = (export == full_seg).mean()
    assert agree > 0.95


def test_mask_in_input_geometry_is_preprocessed_like_a_label(planned) -> None:
    plan, data, geometry, seg = planned
    cascade = plan.configuration("3d_cascade_fullres")
    _, full_seg, props, _ = preprocess_case(data, geometry, seg, plan, cascade)
    assert np.array_equal(seg_to_preprocessed_grid(seg, props, plan, cascade), full_seg)


def test_previous_stage_takes_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        PreviousStage()
    with pytest.raises(ValueError):
        PreviousStage(folder=tmp_path, exports={})
    assert PreviousStage(folder=tmp_path).folder == tmp_path
