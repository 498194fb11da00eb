"""The slab-wise predictor gives the whole-volume path's masks, within the memory it plans."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from autoseg.common.errors import AutosegError
from autoseg.dataset.spec import load_dataset
from autoseg.infer.lean import (
    LeanBudget,
    SlabResampler,
    estimate_lean,
    parse_memory,
    plan_lean,
    predict_labels_lean,
    stream_rows_3d,
)
from autoseg.infer.predict import (
    PredictOptions,
    fold_dirs_for,
    load_model,
    model_logits,
    predict_case,
    predict_labels,
    prepare_case,
)
from autoseg.preprocess import revert_preprocessing

FAST = PredictOptions(tta=False)


def _both(model, images, options):
    lean, _, _ = predict_case([model], images, options)
    full, probs, _ = predict_case([model], images, dataclasses.replace(options, lean=False),
                                  return_probabilities=True)
    return lean, full, probs


@pytest.mark.parametrize("config,folds,tta", [("3d_fullres", [0, 1], False), ("2d", [0], False)])
def test_lean_masks_equal_whole_volume_hippocampus(hippo_trained, config, folds, tta):
    paths, plan = hippo_trained
    case = load_dataset(paths.raw_dataset("Dataset004_Hippocampus")).cases[0]
    model = load_model(fold_dirs_for(paths, plan.dataset, config, folds), "cpu")
    lean, full, probs = _both(model, case.images, PredictOptions(tta=tta))
    assert lean.dtype == full.dtype and lean.shape == full.shape
    assert np.array_equal(lean, full)
    assert len(np.unique(full)) > 1  # the untrained nets predict more than background


def test_lean_masks_equal_on_the_oblique_anisotropic_phantom(phantom_trained):
    paths, plan = phantom_trained
    case = load_dataset(paths.raw_dataset("Dataset999_Phantom")).cases[0]
    model = load_model(fold_dirs_for(paths, plan.dataset, "3d_fullres", [0]), "cpu")
    for step in (0.5, 1.0):
        lean, full, _ = _both(model, case.images, PredictOptions(tta=False, step=step))
        assert np.array_equal(lean, full)


def test_streamed_rows_equal_the_whole_volume_logits(phantom_trained):
    """Rows finalised one patch depth at a time are the whole-volume fold-mean logits (1e-5)."""
    paths, plan = phantom_trained
    case = load_dataset(paths.raw_dataset("Dataset999_Phantom")).cases[0]
    model = load_model(fold_dirs_for(paths, plan.dataset, "3d_fullres", [0]), "cpu")
    data = prepare_case([model], case.images).inputs[0][0]
    whole = model_logits(model, data, FAST).numpy()
    got = np.zeros_like(whole)
    next_row = 0
    for start, rows in stream_rows_3d(model, torch.from_numpy(data), FAST):
        assert start == next_row  # in order, each row once
        got[:, start:start + rows.shape[1]] = rows.numpy()
        next_row = start + rows.shape[1]
    assert next_row == whole.shape[1]
    np.testing.assert_allclose(got, whole, atol=1e-5)
    half = list(stream_rows_3d(model, torch.from_numpy(data), PredictOptions(), torch.float16))
    got16 = np.concatenate([r.numpy() for _, r in half], axis=1)
    full = model_logits(model, data, PredictOptions()).numpy()
    np.testing.assert_allclose(got16, full, atol=2e-3 * max(1.0, float(np.abs(full).max())))


def test_float16_accumulators_keep_the_masks(hippo_trained):
    paths, plan = hippo_trained
    case = load_dataset(paths.raw_dataset("Dataset004_Hippocampus")).cases[0]
    model = load_model(fold_dirs_for(paths, plan.dataset, "3d_fullres", [0, 1]), "cpu")
    prepared = prepare_case([model], case.images)
    data, props = prepared.inputs[0]
    half = predict_labels_lean(model, data, props, FAST, LeanBudget(3, torch.float16, {}))
    whole = predict_labels([model], prepared, dataclasses.replace(FAST, lean=False))
    assert (half == whole).mean() >= 0.999


@pytest.mark.parametrize("net_shape,crop,separate,transpose,chunk,slab", [
    ((9, 14, 11), (20, 31, 17), None, (0, 1, 2), 3, 4),    # upsampled everywhere, isotropic
    ((12, 30, 28), (5, 17, 40), 0, (0, 1, 2), 5, 2),       # coarse first axis: nearest along it
    ((16, 8, 21), (16, 19, 9), 1, (2, 0, 1), 1, 7),        # separate axis in plane, transposed
    ((7, 7, 7), (7, 7, 7), None, (0, 1, 2), 2, 3),         # no resampling
])
def test_slab_resampler_equals_revert_preprocessing(phantom_trained, net_shape, crop, separate, transpose,
                                                    chunk, slab):
    """15 classes of random logits: the slabbed argmax is the argmax of the whole reverted volume."""
    _, plan = phantom_trained
    plan = dataclasses.replace(plan, transpose_forward=transpose,
                               transpose_backward=tuple(int(i) for i in np.argsort(transpose)))
    crop_orig = tuple(crop[plan.transpose_backward[a]] for a in range(3))
    bbox = tuple((2, 2 + s) for s in crop_orig)
    props = _props(plan, crop_orig, bbox, net_shape, separate)
    rng = np.random.default_rng(0)
    probs = rng.random((15, *net_shape)).astype(np.float32)
    expect = np.argmax(revert_preprocessing(probs, props, plan, plan.configuration("3d_fullres")), axis=0)
    labels = np.zeros(props.shape_before_crop, np.uint8)
    out_t = labels[tuple(slice(a, b) for a, b in bbox)].transpose(transpose)
    res = SlabResampler(net_shape, out_t, separate, slab, lambda p: np.argmax(p, axis=0).astype(np.uint8))
    for start in range(0, net_shape[0], chunk):
        res.push(start, torch.from_numpy(probs[:, start:start + chunk]))
    res.finish()
    assert np.array_equal(labels, expect)
    # a slab never holds more source rows than its own, its halo of one and one pushed chunk
    assert res.peak_rows <= np.ceil(slab * net_shape[0] / crop[0]) + 2 + 2 * chunk


def _props(plan, crop_orig, bbox, net_shape, separate):
    from autoseg.dataset.io import Geometry
    from autoseg.preprocess import CaseProperties

    before = tuple(b + 3 for _, b in bbox)
    geom = Geometry(shape=before, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return CaseProperties(case_id="x", original_geometry=geom, shape_before_crop=before, bbox=bbox,
                          shape_after_crop=crop_orig, spacing_original=(1.0, 1.0, 1.0),
                          spacing_after_resampling=(1.0, 1.0, 1.0), shape_after_resampling=net_shape,
                          separate_z_axis=separate, classes_present=())


def test_memory_limit_parsing():
    assert parse_memory("8GB") == 8 * 10**9
    assert parse_memory("500MiB") == 500 * 2**20
    assert parse_memory("1.5g") == 1_500_000_000
    assert parse_memory(None) is None
    for bad in ("8 parsecs", "-1GB", "lots", "0"):
        with pytest.raises(AutosegError, match="--memory-limit|memory"):
            parse_memory(bad)


def test_memory_limit_picks_the_slab_or_fails_in_one_line(hippo_trained):
    paths, plan = hippo_trained
    case = load_dataset(paths.raw_dataset("Dataset004_Hippocampus")).cases[0]
    model = load_model(fold_dirs_for(paths, plan.dataset, "3d_fullres", [0]), "cpu")
    data, props = prepare_case([model], case.images).inputs[0]
    small = estimate_lean(model, data.shape, props, 1, torch.float32, FAST).total
    roomy = plan_lean(model, data.shape, props, 10 * small, FAST)
    assert roomy.total <= 10 * small and roomy.slab_rows == props.shape_after_crop[plan.transpose_forward[0]]
    tight = plan_lean(model, data.shape, props, small, FAST)
    assert tight.total <= small and tight.slab_rows == 1 and tight.accumulator_dtype == torch.float32
    with pytest.raises(AutosegError) as err:
        predict_case([model], case.images, dataclasses.replace(FAST, memory_limit=small // 2))
    msg = str(err.value)
    assert "cannot be met" in msg and "\n" not in msg


def test_predict_cli_memory_limit(hippo_trained, tmp_path):
    import autoseg.cli
    from click.testing import CliRunner

    from tests.infer.conftest import link_inputs

    paths, plan = hippo_trained
    case = load_dataset(paths.raw_dataset("Dataset004_Hippocampus")).cases[1]
    inp = link_inputs(list(case.images), tmp_path / "in")
    base = ["--raw", str(paths.raw), "--results", str(paths.results), "--preprocessed", str(paths.preprocessed),
            "predict", "-d", "4", "-c", "3d_fullres", "-f", "0", "-i", str(inp), "--no-tta", "--device", "cpu"]
    for limit, problem in (("100MB", "cannot be met"), ("8 furlongs", "cannot read memory size")):
        result = CliRunner().invoke(autoseg.cli.cli, [*base, "-o", str(tmp_path / "bad"), "--memory-limit", limit])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and problem in result.stderr
        assert not list((tmp_path / "bad").glob("*.nii.gz"))
    ok = CliRunner().invoke(autoseg.cli.cli, [*base, "-o", str(tmp_path / "out"), "--memory-limit", "8GB"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / f"{case.case_id}.nii.gz").is_file()


def test_lean_region_masks_equal_whole_volume(tmp_path):
    """Sigmoid regions and regions_class_order slab by slab: the whole-volume map."""
    from autoseg.common.paths import Paths
    from autoseg.dataset.phantom import PhantomRecipe, make_region_phantom_dataset
    from tests.infer.conftest import save_untrained_fold, tiny_plan

    paths = Paths.under(tmp_path)
    raw = make_region_phantom_dataset(paths.raw, PhantomRecipe(num_training=2, num_test=1, shape=(12, 40, 40)))
    plan = tiny_plan(paths, raw.name)
    assert plan.label_scheme.has_regions
    save_untrained_fold(paths, plan, "3d_fullres", 0)
    model = load_model(fold_dirs_for(paths, plan.dataset, "3d_fullres", [0]), "cpu")
    case = load_dataset(paths.raw_dataset(raw.name)).cases[0]
    lean, full, _ = _both(model, case.images, FAST)
    assert np.array_equal(lean, full) and len(np.unique(full)) > 1
