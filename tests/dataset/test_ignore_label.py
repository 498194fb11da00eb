"""The ignore label (sparse annotations) at the dataset layer: declaration rules, verify, the spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from autoseg.cli import cli
from autoseg.common.errors import DatasetError, DatasetErrors
from autoseg.common.paths import Paths
from autoseg.dataset.io import read_image, write_image
from autoseg.dataset.phantom import IGNORE_LABEL, PhantomRecipe, make_phantom_dataset
from autoseg.dataset.spec import class_labels, ignore_label, load_dataset
from autoseg.dataset.verify import verify_dataset
from tests.dataset.conftest import TINY_NAME, edit_dataset_json, make_tiny_dataset

LABELS = {"background": 0, "liver": 1, "tumour": 2}
LAB0 = "labelsTr/case_000.nii.gz"


def _sparse(root: Path, ignore: int = 3) -> None:
    """Declare ``ignore`` and mark the first two slices of case_000 with it."""
    edit_dataset_json(root, labels={**LABELS, "ignore": ignore})
    arr, geom = read_image(root / LAB0)
    arr[:2] = ignore
    write_image(root / LAB0, arr, geom)


def test_helpers_read_a_labels_dict() -> None:
    assert ignore_label(LABELS) is None and class_labels(LABELS) == LABELS
    assert ignore_label({**LABELS, "ignore": 3}) == 3
    assert class_labels({**LABELS, "ignore": 3}) == LABELS


def test_a_sparse_dataset_verifies_and_its_spec_knows_the_ignore_label(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw)
    _sparse(root)
    spec = verify_dataset(root, show_progress=False)
    assert spec.ignore_label == 3
    assert (spec.num_classes, spec.foreground_labels) == (3, (1, 2))  # no output channel for "ignore"
    dense = load_dataset(make_tiny_dataset(paths.raw, name="Dataset011_Dense"))
    assert (dense.ignore_label, dense.num_classes, dense.foreground_labels) == (None, 3, (1, 2))


@pytest.mark.parametrize("labels, words", [
    ({**LABELS, "ignore": 5}, "'ignore' must be the highest label value, 3 (one above the other labels 0..2), got 5"),
    ({**LABELS, "ignore": 2}, "'ignore' must be the highest label value, 3 (one above the other labels 0..2), got 2"),
    ({"background": 0, "ignore": 1, "liver": 2, "tumour": 3},
     "label values must be consecutive integers from 0, got [0, 2, 3] (not counting 'ignore')"),
    ({**LABELS, "ignore": [1, 2]}, "label 'ignore' must map to an integer, got [1, 2]"),
])
def test_a_wrong_ignore_value_is_one_line_naming_dataset_json(paths: Paths, labels: dict, words: str) -> None:
    root = make_tiny_dataset(paths.raw)
    edit_dataset_json(root, labels=labels)
    result = CliRunner().invoke(cli, ["--raw", str(paths.raw), "verify", TINY_NAME])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and errors[0].startswith(f"error: {root / 'dataset.json'}: ")
    assert words in errors[0] and "Traceback" not in result.output
    with pytest.raises(DatasetError, match="ignore"):
        load_dataset(root)


def test_ignore_voxels_of_an_undeclared_ignore_label_are_undeclared_values(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw)
    _sparse(root)
    edit_dataset_json(root, labels=LABELS)  # the label file holds 3, dataset.json no longer declares it
    with pytest.raises(DatasetErrors) as info:
        verify_dataset(root, show_progress=False)
    assert [e.where for e in info.value.errors] == [str(root / LAB0)]
    assert "label value(s) 3 not declared" in info.value.errors[0].message


def test_sparse_phantom_keeps_every_nth_slice_and_declares_ignore(tmp_path: Path) -> None:
    recipe = PhantomRecipe(num_training=2, num_test=1, shape=(9, 24, 24), shape_jitter=0, annotate_every_nth_slice=3)
    sparse = make_phantom_dataset(tmp_path / "sparse", recipe)
    dense = make_phantom_dataset(tmp_path / "dense", PhantomRecipe(num_training=2, num_test=1, shape=(9, 24, 24),
                                                                   shape_jitter=0))
    spec = verify_dataset(sparse, show_progress=False)
    assert spec.ignore_label == IGNORE_LABEL == 3 and spec.num_classes == 3
    lab, _ = read_image(sparse / "labelsTr/phantom_000.nii.gz")
    full, _ = read_image(dense / "labelsTr/phantom_000.nii.gz")
    kept = [z for z in range(lab.shape[0]) if not (lab[z] == IGNORE_LABEL).all()]
    assert len(kept) == 3 and np.diff(kept).tolist() == [3, 3]  # every third slice, from a random offset
    assert np.array_equal(lab[kept], full[kept])
    test_lab, _ = read_image(sparse / "labelsTs/phantom_002.nii.gz")
    assert IGNORE_LABEL not in np.unique(test_lab)  # held-out labels stay dense
    with pytest.raises(ValueError, match="annotate_every_nth_slice"):
        PhantomRecipe(annotate_every_nth_slice=0)
