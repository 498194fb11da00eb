"""The ignore label in fingerprint and plan: counted, never a class, never an output channel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from autoseg.common.jsonio import load_record, save_record
from autoseg.dataset.io import Geometry, write_image
from autoseg.dataset.spec import load_dataset
from autoseg.fingerprint import Fingerprint, extract_fingerprint
from autoseg.planning.plan import plan_dataset
from autoseg.planning.plans import Plan
from tests.planning.conftest import make_fingerprint

LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def _sparse_dataset(root: Path) -> None:
    """Two cases: classes 1/2 at intensity 100 (+i), the ignore label (3) over a bright 5000 region."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    geom = Geometry(shape=(6, 10, 10), spacing=(3.0, 0.5, 0.5), origin=(0.0, 0.0, 0.0),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    for i in range(2):
        img = np.full((6, 10, 10), 10.0, dtype=np.float32)
        lab = np.zeros((6, 10, 10), dtype=np.uint8)
        lab[1:3, 3:5, 3:5] = 1
        lab[3:5, 4:7, 4:7] = 2
        img[lab > 0] = 100.0 + i
        lab[5] = 3
        img[5] = 5000.0  # unannotated: may be anything, must not reach the intensity statistics
        write_image(root / "imagesTr" / f"c{i}_0000.nii.gz", img, geom)
        write_image(root / "labelsTr" / f"c{i}.nii.gz", lab, geom)
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2, "ignore": 3},
            "numTraining": 2, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))


def test_fingerprint_counts_ignore_voxels_but_keeps_them_out_of_foreground_intensities(tmp_path: Path) -> None:
    _sparse_dataset(tmp_path / "Dataset012_Sparse")
    fp = extract_fingerprint(load_dataset(tmp_path / "Dataset012_Sparse"), progress_bar=False)
    assert fp.ignore_label == 3
    assert fp.cases[0].class_voxels == {0: 500 - 8 - 18, 1: 8, 2: 18, 3: 100}
    stats = fp.foreground_intensity[0]
    assert (stats.min, stats.max) == (100.0, 101.0)  # the 5000s of the ignore slices are not foreground
    assert stats.percentile_99_5 <= 101.0


def test_plan_has_no_output_channel_for_the_ignore_label(tmp_path: Path) -> None:
    shapes, spacings = [(40, 56, 40)] * 10, [(1.0, 1.0, 1.0)] * 10
    dense = plan_dataset(make_fingerprint(shapes, spacings, labels=LABELS), 8.0)
    sparse = plan_dataset(make_fingerprint(shapes, spacings, labels={**LABELS, "ignore": 3}), 8.0)
    many = {**LABELS, **{f"class{v}": v for v in range(3, 40)}}
    more = plan_dataset(make_fingerprint(shapes, spacings, labels=many), 8.0)
    assert (dense.num_classes, sparse.num_classes, more.num_classes) == (3, 3, 40)
    assert (dense.ignore_label, sparse.ignore_label) == (None, 3)
    # the class count enters the memory estimate (one output map per class); the ignore label does not
    assert sparse.configurations == dense.configurations
    assert sparse.configurations["3d_fullres"].estimated_vram_gb < more.configurations["3d_fullres"].estimated_vram_gb
    save_record(tmp_path / "plans.json", sparse)
    again = load_record(tmp_path / "plans.json", Plan)
    assert again == sparse and again.labels["ignore"] == 3 and again.num_classes == 3


def test_fingerprint_round_trip_keeps_the_ignore_label(tmp_path: Path) -> None:
    fp = make_fingerprint([(20, 20, 20)] * 2, [(1.0, 1.0, 1.0)] * 2, labels={**LABELS, "ignore": 3})
    save_record(tmp_path / "fingerprint.json", fp)
    assert load_record(tmp_path / "fingerprint.json", Fingerprint).ignore_label == 3
