"""Sparse annotations (nnU-Net's ignore label) end to end, on the CPU, through the CLI:
a phantom annotated on every other slice -> plan -> preprocess -> train (tiny) -> validation -> predict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from autoseg.common.jsonio import load_record
from autoseg.common.paths import Paths
from autoseg.dataset.io import read_image
from autoseg.dataset.phantom import IGNORE_LABEL, PhantomRecipe, make_phantom_dataset
from autoseg.evaluate.summary import Summary
from autoseg.train.checkpoint import load_checkpoint
from autoseg.train.loop import tp_fp_fn
from tests.helpers import run_cli_ok

DATASET = "Dataset997_SparsePhantom"
TINY = ["epochs=1", "iterations_per_epoch=2", "val_iterations=1", "batch_size=2", "num_workers=0"]



def test_pseudo_dice_counts_leave_out_ignore_voxels() -> None:
    ref = torch.tensor([[0, 1, 1, 2, 3, 3, 3]])
    pred = torch.tensor([[0, 1, 2, 2, 1, 2, 0]])  # the last three voxels are unannotated
    counts = tp_fp_fn(pred, ref, num_classes=3)
    assert counts.tolist() == [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]  # rows TP, FP, FN; columns class 1, 2
    dense = tp_fp_fn(pred[:, :4], ref[:, :4], num_classes=3)
    assert torch.equal(counts, dense)


def test_sparse_phantom_plans_trains_validates_and_predicts(tmp_path: Path) -> None:
    paths = Paths.under(tmp_path / "data")
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=8, num_test=2, shape=(12, 32, 32), shape_jitter=2,
                                                  annotate_every_nth_slice=2), dataset_name=DATASET)
    run_cli_ok(paths, "plan", DATASET, "--configs", "3d_fullres", "--set", "3d_fullres.patch_size=8,32,32")
    plan = json.loads((paths.preprocessed / DATASET / "plans.json").read_text(encoding="utf-8"))
    assert plan["labels"]["ignore"] == IGNORE_LABEL
    run_cli_ok(paths, "preprocess", DATASET, "--configs", "3d_fullres")
    seg = np.load(paths.preprocessed / DATASET / "3d_fullres" / "phantom_000_seg.npy")
    assert set(np.unique(seg).tolist()) == {0, 1, 2, IGNORE_LABEL}
    with np.load(paths.preprocessed / DATASET / "3d_fullres" / "phantom_000_fg.npz") as fg:
        assert sorted(fg.files) == ["class_1", "class_2"]

    run_cli_ok(paths, "train", DATASET, "3d_fullres", "0", "--quiet", "--device", "cpu",
         *[a for kv in TINY for a in ("--set", kv)])
    fold = paths.results / DATASET / "3d_fullres" / "default" / "fold_0"
    ckpt = load_checkpoint(fold / "checkpoint_final.pt")
    assert ckpt.num_classes == 3  # background, organ, lesion: no channel for "ignore"
    heads = [v for k, v in ckpt.model_state.items() if k.startswith("heads.") and k.endswith(".weight")]
    assert heads and all(w.shape[0] == 3 for w in heads)
    log = [json.loads(line) for line in (fold / "training_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert np.isfinite(log[-1]["train_loss"]) and len(log[-1]["pseudo_dice"]) == 2

    summary = load_record(fold / "validation" / "summary.json", Summary)
    assert summary.labels["ignore"] == IGNORE_LABEL and sorted(summary.mean) == [1, 2]
    for case in summary.cases:
        pred, _ = read_image(Path(case.prediction))
        assert set(np.unique(pred).tolist()) <= {0, 1, 2}
        assert sorted(case.metrics) == [1, 2]

    out = tmp_path / "predictions"
    run_cli_ok(paths, "predict", "-d", DATASET, "-c", "3d_fullres", "-f", "0", "-i", str(paths.raw / DATASET / "imagesTs"),
         "-o", str(out), "--device", "cpu", "--no-tta", "--save-probabilities")
    for f in sorted(out.glob("*.nii.gz")):
        pred, _ = read_image(f)
        assert set(np.unique(pred).tolist()) <= {0, 1, 2}  # never the ignore label
        with np.load(out / f.name.replace(".nii.gz", ".npz")) as z:
            assert z["probabilities"].shape[0] == 3
    assert len(list(out.glob("*.nii.gz"))) == 2

    run_cli_ok(paths, "find-best", DATASET)
    best = json.loads((paths.results / DATASET / "best.json").read_text(encoding="utf-8"))
    assert best["configs"] == ["3d_fullres"]
    assert sorted(best["class_dice_postprocessed"]) == ["1", "2"]  # scored on annotated classes only
    # the validation summary and find-best agree on the same predictions (ignore voxels left out by both)
    assert abs(best["cv_dice"] - summary.foreground_dice) < 1e-6
