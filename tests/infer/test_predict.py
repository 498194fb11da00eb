"""Prediction end to end: geometry round trips, folds/ensembles, skip/force, probabilities, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

import autoseg.cli
from autoseg.common.errors import AutosegError
from autoseg.dataset.io import Geometry, read_image, write_image
from autoseg.dataset.spec import load_dataset
from autoseg.infer.predict import (
    PredictOptions,
    ensemble_probabilities,
    fold_dirs_for,
    group_case_files,
    load_model,
    load_probabilities,
    predict_case,
    predict_folder,
)
from tests.infer.conftest import link_inputs

FAST = PredictOptions(tta=False)


def _assert_same_geometry(pred_file, image_file):
    p, i = sitk.ReadImage(str(pred_file)), sitk.ReadImage(str(image_file))
    assert p.GetSize() == i.GetSize()
    assert p.GetSpacing() == i.GetSpacing()
    assert p.GetOrigin() == i.GetOrigin()
    assert p.GetDirection() == i.GetDirection()


def test_hippocampus_prediction_has_the_input_geometry(hippo_trained, tmp_path):
    paths, plan = hippo_trained
    spec = load_dataset(paths.raw_dataset("Dataset004_Hippocampus"))
    case = spec.cases[0]
    inp = link_inputs(list(case.images), tmp_path / "in")
    model = load_model(fold_dirs_for(paths, plan.dataset, "3d_fullres", [0, 1]), "cpu")
    assert len(model.nets) == 2 and model.mirror_axes == (0, 1, 2)
    res = predict_folder([model], inp, tmp_path / "out", options=FAST, show_progress=False)
    assert res.written == (case.case_id,)
    out = tmp_path / "out" / f"{case.case_id}.nii.gz"
    _assert_same_geometry(out, case.images[0])
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert set(np.unique(seg)) <= {0, 1, 2}


def test_phantom_oblique_anisotropic_round_trip(phantom_trained, tmp_path):
    paths, plan = phantom_trained
    spec = load_dataset(paths.raw_dataset("Dataset999_Phantom"))
    case = spec.cases[0]
    img = sitk.ReadImage(str(case.images[0]))
    assert img.GetDirection() != (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0) and any(img.GetOrigin())
    model = load_model(fold_dirs_for(paths, plan.dataset, "3d_fullres", [0]), "cpu")
    seg, probs, geom = predict_case([model], case.images, FAST, return_probabilities=True)
    assert seg.shape == tuple(reversed(img.GetSize()))
    assert probs.shape == (3, *seg.shape)
    assert np.allclose(probs.sum(0), 1.0, atol=1e-4)
    inp = link_inputs(list(case.images), tmp_path / "in")
    predict_folder([model], inp, tmp_path / "out", options=FAST, show_progress=False)
    _assert_same_geometry(tmp_path / "out" / f"{case.case_id}.nii.gz", case.images[0])


def test_skip_force_and_probabilities(phantom_trained, tmp_path):
    paths, plan = phantom_trained
    spec = load_dataset(paths.raw_dataset("Dataset999_Phantom"))
    inp = link_inputs([f for c in spec.cases[:2] for f in c.images], tmp_path / "in")
    model = load_model(fold_dirs_for(paths, plan.dataset, "3d_fullres", [0]), "cpu")
    out = tmp_path / "out"
    first = predict_folder([model], inp, out, save_probabilities=True, options=FAST, show_progress=False)
    assert len(first.written) == 2 and not first.skipped
    cid = first.written[0]
    probs, rec = load_probabilities(out, cid)
    assert probs.shape[0] == 3 and tuple(probs.shape[1:]) == rec.geometry.shape
    stamp = (out / f"{cid}.nii.gz").stat().st_mtime_ns
    second = predict_folder([model], inp, out, save_probabilities=True, options=FAST, show_progress=False)
    assert second.written == () and len(second.skipped) == 2
    assert (out / f"{cid}.nii.gz").stat().st_mtime_ns == stamp
    (out / f"{cid}.json").unlink()  # a case whose sidecar is missing counts as unfinished
    third = predict_folder([model], inp, out, save_probabilities=True, options=FAST, show_progress=False)
    assert third.written == (cid,)
    forced = predict_folder([model], inp, out, force=True, options=FAST, show_progress=False)
    assert len(forced.written) == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    # averaging a folder with itself reproduces its argmax
    ens = ensemble_probabilities([out, out], tmp_path / "ens", show_progress=False)
    assert len(ens.written) == 2
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{cid}.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ens" / f"{cid}.nii.gz")))
    assert (a == b).mean() > 0.999  # float16 storage may flip exact ties


def test_2d_configuration_and_config_ensemble(hippo_trained, tmp_path):
    paths, plan = hippo_trained
    spec = load_dataset(paths.raw_dataset("Dataset004_Hippocampus"))
    case = spec.cases[1]
    m2d = load_model(fold_dirs_for(paths, plan.dataset, "2d", [0]), "cpu")
    m3d = load_model(fold_dirs_for(paths, plan.dataset, "3d_fullres", [0]), "cpu")
    seg2d, p2d, geom = predict_case([m2d], case.images, FAST, return_probabilities=True)
    _, p3d, _ = predict_case([m3d], case.images, FAST, return_probabilities=True)
    _, pens, _ = predict_case([m2d, m3d], case.images, FAST, return_probabilities=True)
    assert seg2d.shape == geom.shape
    assert np.allclose(pens, (p2d + p3d) / 2, atol=1e-5)


def test_tta_changes_untrained_prediction_but_keeps_shape(phantom_trained):
    paths, plan = phantom_trained
    case = load_dataset(paths.raw_dataset("Dataset999_Phantom")).cases[1]
    model = load_model(fold_dirs_for(paths, plan.dataset, "3d_fullres", [0]), "cpu")
    _, p0, _ = predict_case([model], case.images, FAST, return_probabilities=True)
    _, p1, _ = predict_case([model], case.images, PredictOptions(tta=True), return_probabilities=True)
    assert p0.shape == p1.shape and not np.allclose(p0, p1)


def test_input_grouping_errors(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a_0000.nii.gz").touch()
    (d / "a_0001.nii.gz").touch()
    (d / "b_0000.nii.gz").touch()
    with pytest.raises(AutosegError, match="b_0001.nii.gz"):
        group_case_files(d, 2)
    (d / "b_0001.nii.gz").touch()
    cases, ending = group_case_files(d, 2)
    assert ending == ".nii.gz" and [p.name for p in cases["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    with pytest.raises(AutosegError, match="channel 1 but the model takes 1"):
        group_case_files(d, 1)
    (d / "noindex.nii.gz").touch()
    with pytest.raises(AutosegError, match="_XXXX"):
        group_case_files(d, 2)


def test_missing_checkpoint_is_one_clear_line(hippo_trained, tmp_path):
    paths, plan = hippo_trained
    (tmp_path / "in").mkdir()
    result = CliRunner().invoke(autoseg.cli.cli, [
        "--raw", str(paths.raw), "--results", str(paths.results), "--preprocessed", str(paths.preprocessed),
        "predict", "-d", "4", "-c", "3d_fullres", "-f", "0", "1", "2", "-i", str(tmp_path / "in"),
        "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "fold_2/checkpoint_final.pt" in result.stderr and "checkpoint not found" in result.stderr


def test_predict_cli_folds_space_separated(hippo_trained, tmp_path):
    paths, plan = hippo_trained
    case = load_dataset(paths.raw_dataset("Dataset004_Hippocampus")).cases[2]
    inp = link_inputs(list(case.images), tmp_path / "in")
    base = ["--raw", str(paths.raw), "--results", str(paths.results), "--preprocessed", str(paths.preprocessed),
            "predict", "-d", "Dataset004_Hippocampus", "-c", "3d_fullres", "-f", "0", "1", "-i", str(inp),
            "-o", str(tmp_path / "out"), "--no-tta", "--device", "cpu", "--step", "0.5", "-j", "2"]
    result = CliRunner().invoke(autoseg.cli.cli, base)
    assert result.exit_code == 0, result.output
    assert "predicted 1 case(s)" in result.output
    _assert_same_geometry(tmp_path / "out" / f"{case.case_id}.nii.gz", case.images[0])
    again = CliRunner().invoke(autoseg.cli.cli, base)
    assert again.exit_code == 0 and "skipped 1" in again.output


def test_unreadable_case_fails_clearly_and_keeps_finished_ones(phantom_trained, tmp_path):
    paths, plan = phantom_trained
    case = load_dataset(paths.raw_dataset("Dataset999_Phantom")).cases[0]
    inp = link_inputs(list(case.images), tmp_path / "in")
    (inp / "zz_broken_0000.nii.gz").write_bytes(b"not an image")
    model = load_model(fold_dirs_for(paths, plan.dataset, "3d_fullres", [0]), "cpu")
    with pytest.raises(AutosegError, match="zz_broken_0000.nii.gz"):
        predict_folder([model], inp, tmp_path / "out", options=FAST, show_progress=False, num_workers=2)
    assert (tmp_path / "out" / f"{case.case_id}.nii.gz").is_file()
    assert not (tmp_path / "out" / "zz_broken.nii.gz").exists()


def _predict_cli(paths, inp, out):
    return CliRunner().invoke(autoseg.cli.cli, [
        "--raw", str(paths.raw), "--results", str(paths.results), "--preprocessed", str(paths.preprocessed),
        "predict", "-d", "Dataset999_Phantom", "-c", "3d_fullres", "-f", "0", "-i", str(inp), "-o", str(out),
        "--no-tta", "--device", "cpu"])


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_truncated_input_is_refused_and_no_mask_is_written(phantom_trained, tmp_path, ending):
    """ITK reads a cut NIfTI as a complete image with zeros at the end: predicting it wrote a wrong mask."""
    paths, plan = phantom_trained
    case = load_dataset(paths.raw_dataset("Dataset999_Phantom")).cases[0]
    arr, geom = read_image(case.images[0])
    path = write_image(tmp_path / "in" / f"cut_0000{ending}", arr, geom)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result = _predict_cli(paths, tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
    assert result.stderr.splitlines()[-1].startswith(f"error: {path}: truncated image: ")
    assert not list((tmp_path / "out").glob("cut*"))


def test_2d_image_for_a_3d_model_is_refused(phantom_trained, tmp_path):
    paths, plan = phantom_trained
    case = load_dataset(paths.raw_dataset("Dataset999_Phantom")).cases[0]
    arr, geom = read_image(case.images[0])
    flat = Geometry(shape=(1, *arr.shape[1:]), spacing=(999.0, *geom.spacing[1:]), origin=geom.origin[:2],
                    direction=(1.0, 0.0, 0.0, 1.0), file_ndim=2)
    path = write_image(tmp_path / "in" / "flat_0000.nii.gz", arr[arr.shape[0] // 2][None], flat)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    result = _predict_cli(paths, tmp_path / "in", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1] == (f"error: {path}: input is a 2D image (shape {flat.shape}); the "
                                              "3d_fullres model needs 3D volumes (use a 2d configuration)")
    assert not list((tmp_path / "out").glob("flat*"))
