"""Tiny label maps written as NIfTI folders for evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset.io import Geometry, write_image

LABELS = {"background": 0, "organ": 1, "lesion": 2}
GEOM = Geometry(shape=(10, 12, 12), spacing=(2.0, 1.0, 1.0), origin=(5.0, -3.0, 1.0),
                direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def make_ref(case: int) -> np.ndarray:
    seg = np.zeros(GEOM.shape, np.uint8)
    seg[2:7, 3:9, 3:9] = 1
    seg[3:5, 4:6 + case % 2, 4:6] = 2
    return seg


def make_pred(i: int) -> np.ndarray:
    """Case ``i``'s prediction in `eval_folders`: the reference, with case 1's class 2 labelled 1 and a
    stray organ blob in case 2."""
    p = make_ref(i).copy()
    if i == 1:
        p[p == 2] = 1
    if i == 2:
        p[8:10, 0:2, 0:2] = 1
    return p


@pytest.fixture
def eval_folders(tmp_path: Path) -> tuple[Path, Path]:
    """ref/ with 3 cases; pred/ = ref with case_1's class 2 missing and a stray organ blob in case_2."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for i in range(3):
        r, p = make_ref(i), make_pred(i)
        write_image(ref / f"case_{i}.nii.gz", r, GEOM)
        write_image(pred / f"case_{i}.nii.gz", p, GEOM)
    return pred, ref


def make_raw_dataset_json(raw_root: Path, name: str = "Dataset123_Toy") -> Path:
    """A raw folder holding only dataset.json (enough for `autoseg evaluate -d`)."""
    d = raw_root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": LABELS,
                                                "numTraining": 3, "file_ending": ".nii.gz"}))
    return d


def write_validation(paths, dataset: str, config: str, fold: int, refs: dict[str, Path],
                     preds: dict[str, np.ndarray], probs: dict[str, np.ndarray] | None = None,
                     labels: dict[str, int] = LABELS) -> Path:
    """A fold's ``validation/`` as training leaves it: CASE.nii.gz (+ CASE.npz/json) and summary.json."""
    from autoseg.common.jsonio import save_record
    from autoseg.common.paths import TrainingId
    from autoseg.evaluate.summary import SUMMARY_FILE, evaluate_pairs
    from autoseg.infer.predict import write_probabilities

    vdir = paths.training_dir(TrainingId(dataset, config, fold, "default")) / "validation"
    pairs = []
    for cid, seg in preds.items():
        write_image(vdir / f"{cid}.nii.gz", seg, GEOM)
        if probs is not None:
            write_probabilities(vdir, cid, probs[cid], GEOM, labels, ".nii.gz")
        pairs.append((cid, vdir / f"{cid}.nii.gz", refs[cid]))
    save_record(vdir / SUMMARY_FILE, evaluate_pairs(pairs, labels, show_progress=False))
    return vdir
