"""A ResEnc preset through the CLI on the phantom: plan --preset -> preprocess -> train -> predict -> export.

The preset's plans live in plans_resenc-m.json beside plans.json, its trainings in
results/<ds>/resenc-m__3d_fullres/, and a missing preset plan is a one-line error naming the
command to run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import autoseg.cli
from autoseg.common.paths import Paths
from autoseg.dataset.io import read_image
from autoseg.train.checkpoint import load_checkpoint
from tests.helpers import run_cli_ok

DATASET = "Dataset999_Phantom"
TINY = ["epochs=1", "iterations_per_epoch=2", "val_iterations=1", "batch_size=2", "num_workers=0",
        "final_validation=off"]


def _invoke(paths: Paths, *args: str):
    roots = ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]
    return CliRunner().invoke(autoseg.cli.cli, [*roots, *args])


def test_missing_preset_plans_is_one_line_error(phantom_small: Paths, tmp_path: Path) -> None:
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pre", results=tmp_path / "res")
    run_cli_ok(paths, "plan", "999", "--configs", "3d_fullres", "--gpu-memory", "8")  # only the default plan
    for args in (("train", "999", "3d_fullres", "0", "--plans", "resenc-l"),
                 ("preprocess", "999", "--plans", "resenc-l")):
        result = _invoke(paths, *args)
        assert result.exit_code == 2, result.output
        want = (f"error: {paths.plans_file(DATASET, 'resenc-l')}: no resenc-l plan yet; run "
                f"`autoseg plan {DATASET} --preset resenc-l` first")
        assert result.stderr.strip() == want
    assert not (paths.results / DATASET).exists()


@pytest.mark.slow
def test_plan_preset_train_predict_export(phantom_small: Paths, tmp_path: Path) -> None:
    paths = Paths(raw=phantom_small.raw, preprocessed=tmp_path / "pre", results=tmp_path / "res")
    out = run_cli_ok(paths, "plan", "999", "--preset", "resenc-m", "--configs", "3d_fullres")
    assert "preset resenc-m" in out and "residual blocks" in out
    plans_file = paths.plans_file(DATASET, "resenc-m")
    assert plans_file.name == "plans_resenc-m.json" and not paths.plans_file(DATASET).exists()
    run_cli_ok(paths, "preprocess", "999", "--plans", "resenc-m")
    assert (paths.preprocessed / DATASET / "3d_fullres").is_dir()

    run_cli_ok(paths, "train", "999", "3d_fullres", "0", "--plans", "resenc-m", "--quiet", "--device", "cpu",
               *[a for kv in TINY for a in ("--set", kv)])
    fold = paths.results / DATASET / "resenc-m__3d_fullres" / "default" / "fold_0"
    assert (fold / "checkpoint_final.pt").is_file()
    assert not (paths.results / DATASET / "3d_fullres").exists()  # never the default plan's folder
    ckpt = load_checkpoint(fold / "checkpoint_final.pt")
    assert ckpt.plan.preset == "resenc-m" and ckpt.plan.configuration("3d_fullres").encoder == "residual"
    assert any(".conv2." in k for k in ckpt.model_state)  # residual blocks were trained

    images = sorted((paths.raw / DATASET / "imagesTs").iterdir())
    pred = tmp_path / "pred"
    run_cli_ok(paths, "predict", "-d", "999", "-c", "3d_fullres", "-f", "0", "--plans", "resenc-m",
               "-i", str(paths.raw / DATASET / "imagesTs"), "-o", str(pred), "--no-tta", "--device", "cpu")
    written = sorted(pred.glob("*.nii.gz"))
    assert len(written) == len(images) > 0
    seg, geo = read_image(written[0])
    _, ref_geo = read_image(images[0])
    assert geo.same_grid(ref_geo) and set(map(int, set(seg.ravel().tolist()))) <= {0, 1, 2}
    # the folder name works as a configuration as well (how find-best and ensembles name it)
    again = tmp_path / "pred2"
    run_cli_ok(paths, "predict", "-d", "999", "-c", "resenc-m__3d_fullres", "-f", "0", "-i",
               str(paths.raw / DATASET / "imagesTs"), "-o", str(again), "--no-tta", "--device", "cpu")
    assert sorted(p.name for p in again.glob("*.nii.gz")) == [p.name for p in written]

    pytest.importorskip("onnxruntime")
    onnx = tmp_path / "model.onnx"
    run_cli_ok(paths, "export-onnx", "-d", "999", "-c", "3d_fullres", "-f", "0", "--plans", "resenc-m",
               "-o", str(onnx))
    record = json.loads(onnx.with_suffix(".json").read_text(encoding="utf-8"))
    assert onnx.is_file() and record["plans"] == "resenc-m" and record["max_abs_diff"] <= record["tolerance"]
