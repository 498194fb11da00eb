"""The nnU-Net cascade end to end on a tiny phantom, on the CPU, through the CLI:
plan (lowres forced) -> preprocess -> train 3d_lowres folds 0-4 -> train 3d_cascade_fullres fold 0
-> validation -> predict held-out images (lowres predicted first, or read from a folder) -> find-best.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from autoseg.cli import cli
from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths, TrainingId
from autoseg.dataset.io import read_image
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.evaluate.best import find_best
from autoseg.evaluate.summary import Summary
from autoseg.infer.cascade import next_stage_file, previous_stage_exports
from autoseg.planning.store import load_plan
from autoseg.splits import ensure_splits, fold_cases, load_splits
from autoseg.train.checkpoint import load_checkpoint

DATASET = "Dataset999_Phantom"
TINY = ["epochs=1", "iterations_per_epoch=2", "val_iterations=1", "batch_size=2", "num_workers=0",
        "augment.mirror=false"]


def _run(paths: Paths, *args: str, ok: bool = True) -> str:
    roots = ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]
    result = CliRunner().invoke(cli, [*roots, *args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result.output


def _train(paths: Paths, config: str, fold: int) -> None:
    _run(paths, "train", "999", config, str(fold), "--quiet", "--device", "cpu", "--save-probabilities",
         *[a for kv in TINY for a in ("--set", kv)])


def test_missing_lowres_folds_are_named(tmp_path: Path) -> None:
    paths = Paths.under(tmp_path)
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=5, num_test=0, shape=(8, 24, 24), shape_jitter=0))
    _run(paths, "plan", "999", "--configs", "3d_cascade_fullres")
    plan = load_plan(paths, DATASET)
    ensure_splits(paths, DATASET, sorted(p.name[:-len("_0000.nii.gz")]
                                         for p in (paths.raw / DATASET / "imagesTr").iterdir()))
    tid = TrainingId(DATASET, "3d_cascade_fullres", 0)
    splits = load_splits(paths, DATASET)
    for k in (0, 2):  # two folds trained, one of them without its export
        fold = paths.training_dir(TrainingId(DATASET, "3d_lowres", k))
        fold.mkdir(parents=True)
        (fold / "checkpoint_final.pt").write_bytes(b"")
        if k == 0:
            for cid in fold_cases(splits, k)[1]:
                next_stage_file(fold / "validation", "3d_cascade_fullres", cid).parent.mkdir(parents=True,
                                                                                            exist_ok=True)
                next_stage_file(fold / "validation", "3d_cascade_fullres", cid).write_bytes(b"")
    with pytest.raises(AutosegError) as info:
        previous_stage_exports(paths, tid, plan)
    assert info.value.message == ("3d_cascade_fullres needs every 3d_lowres fold trained and validated first; "
                                  "missing fold(s) 1 (not trained), 2 (no export for 1 validation case(s)), "
                                  "3 (not trained), 4 (not trained)")
    assert str(info.value.where).endswith("3d_lowres/default")
    out = _run(paths, "train", "999", "3d_cascade_fullres", "0", "--quiet", "--device", "cpu", ok=False)
    assert "missing fold(s) 1 (not trained)" in out
    assert not paths.training_dir(tid).exists()  # refused before touching the fold dir


@pytest.mark.slow
def test_cascade_plan_train_predict(tmp_path: Path) -> None:
    paths = Paths.under(tmp_path)
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=10, num_test=2, shape=(12, 40, 40), shape_jitter=4))
    _run(paths, "plan", "999", "--configs", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
    plan = load_plan(paths, DATASET)
    assert list(plan.configurations) == ["3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    _run(paths, "preprocess", "999")
    assert not (paths.preprocessed / DATASET / "3d_cascade_fullres").exists()  # shares 3d_fullres' data

    for fold in range(5):
        _train(paths, "3d_lowres", fold)
    splits = load_splits(paths, DATASET)
    pp = paths.preprocessed / DATASET / "3d_fullres"
    for fold in range(5):
        validation = paths.training_dir(TrainingId(DATASET, "3d_lowres", fold)) / "validation"
        for cid in fold_cases(splits, fold)[1]:
            export = np.load(next_stage_file(validation, "3d_cascade_fullres", cid))
            assert export.shape == np.load(pp / f"{cid}_seg.npy").shape and export.dtype == np.int8
            assert set(np.unique(export)) <= {0, 1, 2}

    _train(paths, "3d_cascade_fullres", 0)
    fold0 = paths.training_dir(TrainingId(DATASET, "3d_cascade_fullres", 0))
    assert load_checkpoint(fold0 / "checkpoint_final.pt").num_input_channels == 1 + 2  # image + K-1 one-hot
    summary = load_record(fold0 / "validation" / "summary.json", Summary)
    assert sorted(c.case_id for c in summary.cases) == sorted(fold_cases(splits, 0)[1])

    images_ts = paths.raw / DATASET / "imagesTs"
    _run(paths, "predict", "-d", "999", "-c", "3d_cascade_fullres", "-f", "0", "-i", str(images_ts),
         "-o", str(tmp_path / "cascade"), "--device", "cpu")
    _run(paths, "predict", "-d", "999", "-c", "3d_lowres", "-f", "0", "-i", str(images_ts),
         "-o", str(tmp_path / "lowres"), "--device", "cpu")
    _run(paths, "predict", "-d", "999", "-c", "3d_cascade_fullres", "-f", "0", "-i", str(images_ts),
         "-o", str(tmp_path / "from_folder"), "--device", "cpu", "--prev-stage-predictions", str(tmp_path / "lowres"))
    inputs = sorted(images_ts.glob("*_0000.nii.gz"))
    assert inputs
    for image in inputs:
        cid = image.name[:-len("_0000.nii.gz")]
        mask, geometry = read_image(tmp_path / "cascade" / f"{cid}.nii.gz")
        _, image_geometry = read_image(image)
        assert geometry.same_grid(image_geometry) and mask.shape == image_geometry.shape
        # the lowres stage predicted on the fly equals the one read from its folder
        assert np.array_equal(read_image(tmp_path / "from_folder" / f"{cid}.nii.gz")[0], mask)

    _run(paths, "predict", "-d", "999", "-c", "3d_lowres", "3d_cascade_fullres", "-f", "0", "-i", str(images_ts),
         "-o", str(tmp_path / "ensemble"), "--device", "cpu")
    assert sorted(p.name for p in (tmp_path / "ensemble").glob("*.nii.gz")) == sorted(
        p.name for p in (tmp_path / "cascade").glob("*.nii.gz"))

    best = find_best(paths, DATASET)  # discovers both configurations; compares the pair ensemble
    names = {c.configs for c in best.candidates}
    assert {("3d_cascade_fullres",), ("3d_lowres",)} <= names and len(names) == 3
    assert best.folds == (0,)
