"""End-of-training validation, find-best over CV folds, predict --best, and ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

import autoseg.cli
import autoseg.infer.onnx_export as onnx_export
from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths
from autoseg.dataset.spec import load_dataset
from autoseg.evaluate.best import BestConfig, find_best
from autoseg.evaluate.summary import Summary
from autoseg.infer.predict import PredictOptions, fold_dirs_for, load_model
from autoseg.pipeline.validate import run_validation
from tests.dice_check import check_summary_against_files
from tests.infer.conftest import link_inputs, save_untrained_fold, tiny_plan

FAST = PredictOptions(tta=False)


def _cli(paths: Paths, *args: str):
    return CliRunner().invoke(autoseg.cli.cli, ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
                                                "--results", str(paths.results), *args])


@pytest.fixture(scope="module")
def phantom_cv(phantom_small: Paths, tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """Two configurations x two folds of untrained nets on the phantom, validated with probabilities."""
    root = tmp_path_factory.mktemp("infer_cv")
    paths = Paths(raw=phantom_small.raw, preprocessed=root / "pre", results=root / "res")
    plan = tiny_plan(paths, "Dataset999_Phantom")
    ids = [c.case_id for c in load_dataset(paths.raw_dataset(plan.dataset)).cases][:4]
    for config in ("3d_fullres", "2d"):
        for fold, val in ((0, ids[:2]), (1, ids[2:])):
            fold_dir = save_untrained_fold(paths, plan, config, fold, seed=fold + 10 * (config == "2d"))
            model = load_model([fold_dir], "cpu")
            run_validation(model.nets[0], plan, plan.configuration(config), model.mirror_axes, val, paths,
                           plan.dataset, fold_dir / "validation", "cpu", save_probabilities=True,
                           options=FAST, show_progress=False)
    return paths


def test_run_validation_writes_predictions_and_summary(phantom_cv):
    paths = phantom_cv
    fold_dir = fold_dirs_for(paths, "Dataset999_Phantom", "3d_fullres", [0])[0]
    summary = load_record(fold_dir / "validation" / "summary.json", Summary)
    assert len(summary.cases) == 2 and set(summary.mean) == {1, 2}
    spec = load_dataset(paths.raw_dataset("Dataset999_Phantom"))
    for c in summary.cases:
        pred = fold_dir / "validation" / f"{c.case_id}.nii.gz"
        ref = sitk.ReadImage(str(spec.case(c.case_id).label))
        p = sitk.ReadImage(str(pred))
        assert p.GetSize() == ref.GetSize() and p.GetDirection() == ref.GetDirection()
        assert (fold_dir / "validation" / f"{c.case_id}.npz").is_file()
    # the Dice of each case and label, and the means, are what the written masks give
    recount = check_summary_against_files(fold_dir / "validation", summary)
    assert set(recount) == {c.case_id for c in summary.cases} and all(set(d) == {1, 2} for d in recount.values())


def test_run_validation_restores_training_state(phantom_trained, tmp_path):
    paths, plan = phantom_trained
    from autoseg.nets.unet import build_unet
    net = build_unet(plan.configuration("3d_fullres"), 1, 3, deep_supervision=True).train()
    case_id = load_dataset(paths.raw_dataset(plan.dataset)).cases[3].case_id
    s = run_validation(net, plan, plan.configuration("3d_fullres"), (), [case_id], paths, plan.dataset,
                       tmp_path / "validation", "cpu", options=FAST, show_progress=False)
    assert net.training and net.deep_supervision
    assert [c.case_id for c in s.cases] == [case_id] and (tmp_path / "validation" / "summary.json").is_file()


def test_find_best_and_predict_with_best(phantom_cv, tmp_path):
    paths = phantom_cv
    best = find_best(paths, "Dataset999_Phantom")
    names = {c.configs for c in best.candidates}
    assert names == {("2d",), ("3d_fullres",), ("2d", "3d_fullres")}
    top = max(c.foreground_dice for c in best.candidates)
    assert best.cv_dice == pytest.approx(top)
    assert best.cv_dice_postprocessed >= best.cv_dice - 1e-9
    assert best.folds == (0, 1)
    assert load_record(paths.results / "Dataset999_Phantom" / "best.json", BestConfig) == best
    with pytest.raises(AutosegError, match="--force"):
        find_best(paths, "Dataset999_Phantom")
    result = _cli(paths, "find-best", "999", "-c", "3d_fullres", "2d", "--force")
    assert result.exit_code == 0, result.output
    assert "best:" in result.output and "postprocessing:" in result.output

    spec = load_dataset(paths.raw_dataset("Dataset999_Phantom"))
    inp = link_inputs(list(spec.test_cases[0].images), tmp_path / "in")
    best_file = str(paths.results / "Dataset999_Phantom" / "best.json")
    result = _cli(paths, "predict", "--best", best_file, "-i", str(inp), "-o", str(tmp_path / "out"), "--no-tta")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / f"{spec.test_cases[0].case_id}.nii.gz"
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(spec.test_cases[0].images[0])).GetSize()
    wrong = _cli(paths, "predict", "-d", "Dataset004_Hippocampus", "--best", best_file, "-i", str(inp),
                 "-o", str(tmp_path / "out2"))
    assert wrong.exit_code == 2 and "was made for Dataset999_Phantom" in wrong.stderr


def test_find_best_without_results_is_a_clear_error(paths):
    with pytest.raises(AutosegError, match="no results"):
        find_best(paths, "Dataset999_Phantom")


def test_export_onnx_cli_and_record(phantom_trained, tmp_path):
    paths, plan = phantom_trained
    out = tmp_path / "model.onnx"
    result = _cli(paths, "export-onnx", "-d", "999", "-c", "3d_fullres", "-f", "0", "-o", str(out))
    assert result.exit_code == 0, result.output
    rec = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert rec["schema"] == "autoseg.onnx_export" and rec["opset"] == 17
    assert rec["input_shape"] == [1, 1, *plan.configuration("3d_fullres").patch_size]
    assert rec["max_abs_diff"] <= rec["tolerance"]
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.zeros((2, *rec["input_shape"][1:]), np.float32)  # the batch axis is dynamic
    assert sess.run(None, {"image": x})[0].shape == (2, 3, *rec["input_shape"][2:])
    again = _cli(paths, "export-onnx", "-d", "999", "-c", "3d_fullres", "-f", "0", "-o", str(out))
    assert again.exit_code == 2 and "--force" in again.stderr


def test_export_onnx_fails_when_runtimes_disagree(phantom_trained, tmp_path, monkeypatch):
    paths, plan = phantom_trained
    monkeypatch.setattr(onnx_export, "_check_with_onnxruntime", lambda *a: 0.5)
    out = tmp_path / "bad.onnx"
    with pytest.raises(AutosegError, match="differ from torch"):
        onnx_export.export_onnx(paths, plan.dataset, "3d_fullres", 0, out)
    assert not out.exists() and not list(tmp_path.iterdir())
