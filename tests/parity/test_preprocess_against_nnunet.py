"""Differential test: autoseg's preprocessing against nnU-Net 2.8.1's DefaultPreprocessor.

The same raw case (the oblique, anisotropic phantom: transposition, cropping to the nonzero
region, z-score normalisation) goes through autoseg's `preprocess_dataset` and nnU-Net's
`DefaultPreprocessor.run_case` with an nnU-Net plan made from autoseg's (same target spacing,
transposition and normalisation; nnU-Net's default resampling: order 3 data, order 1 per-label
segmentation, separate nearest z when anisotropic). Compared: crop box, shapes, image values,
segmentation, and the foreground-location sampling pool.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("nnunetv2", reason="nnunetv2 (the parity reference) is not installed; see README")
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from autoseg.common.jsonio import save_record  # noqa: E402
from autoseg.common.paths import Paths  # noqa: E402
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset  # noqa: E402
from autoseg.planning.plan import apply_plan_overrides  # noqa: E402
from autoseg.planning.planner import PlanRequest, plan_and_save  # noqa: E402
from autoseg.preprocess import load_preprocessed_case, preprocess_dataset  # noqa: E402

DATASET = "Dataset998_ParityPhantom"


def _nnunet_plans(plan, config) -> dict:  # noqa: ANN001 - autoseg Plan / Configuration
    """nnU-Net's plans dict for one autoseg configuration (only what preprocessing reads)."""
    norm = plan.normalization[0]
    assert norm.scheme == "zscore"
    resampling = "resample_data_or_seg_to_shape"
    return {
        "dataset_name": DATASET, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "original_median_spacing_after_transp": list(config.spacing),
        "original_median_shape_after_transp": list(config.median_shape),
        "transpose_forward": list(plan.transpose_forward), "transpose_backward": list(plan.transpose_backward),
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0,
                                                              "percentile_00_5": 0.0, "percentile_99_5": 1.0,
                                                              "std": 1.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nn_3d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(config.patch_size), "median_image_size_in_voxels": list(config.median_shape),
            "spacing": list(config.spacing), "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [bool(norm.use_nonzero_mask)],
            "resampling_fn_data": resampling, "resampling_fn_seg": resampling,
            "resampling_fn_probabilities": resampling,
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []},
            "batch_dice": False}},
    }


def _pad_with_zeros(raw: Path) -> None:
    """A zero frame (x: 3 low / 2 high, y: 0 / 4, z: 1 / 0) around every case, so cropping to the
    nonzero region has something to remove."""
    for image in sorted((raw / "imagesTr").glob("*_0000.nii.gz")):
        label = raw / "labelsTr" / image.name.replace("_0000", "")
        for f in (image, label):
            sitk.WriteImage(sitk.ConstantPad(sitk.ReadImage(str(f)), [3, 0, 1], [2, 4, 0], 0), str(f))


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pp_parity")
    paths = Paths.under(root)
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=3, num_test=0, shape=(12, 40, 40), shape_jitter=4),
                         dataset_name=DATASET)
    _pad_with_zeros(paths.raw / DATASET)
    plan = plan_and_save(paths, DATASET, PlanRequest(configs=("3d_fullres",), progress_bar=False)).plan
    out = {}
    for name, overrides in (("native", []), ("resampled", ["3d_fullres.spacing=2.0,1.3,1.1"])):
        p = apply_plan_overrides(plan, overrides) if overrides else plan
        plan_file = root / f"{name}.json"
        save_record(plan_file, p)
        preprocess_dataset(paths, DATASET, ["3d_fullres"], plan=p)
        config = p.configuration("3d_fullres")
        raw = paths.raw / DATASET
        nn = DefaultPreprocessor(verbose=False)
        pm = PlansManager(_nnunet_plans(p, config))
        dataset_json = json.loads((raw / "dataset.json").read_text())
        cases = {}
        for case in ("phantom_000", "phantom_001"):
            ours = load_preprocessed_case(paths.preprocessed_data(DATASET, config.data_identifier), case, mmap=False)
            data, seg, props = nn.run_case([str(raw / "imagesTr" / f"{case}_0000.nii.gz")],
                                           str(raw / "labelsTr" / f"{case}.nii.gz"), pm,
                                           pm.get_configuration("3d_fullres"), dataset_json)
            cases[case] = (ours, data, seg, props)
        out[name] = (config, cases)
    out["masked"] = any(n.use_nonzero_mask for n in plan.normalization)
    return out


@pytest.mark.parametrize("name", ["native", "resampled"])
def test_preprocessed_arrays_are_nnunets(both: dict, name: str) -> None:
    config, cases = both[name]
    for case, (ours, data, seg, props) in cases.items():
        assert [list(b) for b in ours.properties.bbox] == [list(b) for b in props["bbox_used_for_cropping"]], case
        assert ours.properties.shape_after_crop != ours.properties.shape_before_crop  # the frame was cropped
        assert tuple(ours.properties.shape_after_crop) == tuple(props["shape_after_cropping_and_before_resampling"])
        assert ours.data.shape == data.shape and ours.seg.shape == seg.shape, case
        # measured equal to the last bit (2026-12-04); the tolerance only allows float rounding
        np.testing.assert_allclose(ours.data, data, atol=1e-6, rtol=0, err_msg=case)
        # nnU-Net always writes -1 outside the nonzero mask, we only when a channel is normalized inside it
        np.testing.assert_array_equal(ours.seg, seg if both["masked"] else np.maximum(seg, 0), err_msg=case)


@pytest.mark.parametrize("name", ["native", "resampled"])
def test_foreground_pools_cover_the_same_voxels(both: dict, name: str) -> None:
    """Both keep a sample of each class's voxel coordinates for forced-foreground patches."""
    _, cases = both[name]
    for case, (ours, _data, seg, props) in cases.items():
        for k, theirs in props["class_locations"].items():
            mine = ours.fg_locations[int(k)]
            assert len(mine) == len(theirs) > 0, (case, k)  # same sample size rule
            labels = ours.seg[0][tuple(mine.T[-3:])]
            assert (labels == int(k)).all(), (case, k)  # every pooled voxel really is class k
            np.testing.assert_allclose(mine[:, -3:].mean(0), np.asarray(theirs)[:, -3:].mean(0), atol=1.5)
