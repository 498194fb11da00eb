"""load_dataset: the structural view other stages use (no image opened, first problem raised)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoseg.common.errors import DatasetError, DatasetErrors
from autoseg.common.paths import Paths
from autoseg.dataset.spec import ProblemCollector, load_dataset, read_dataset_json, scan_dataset
from tests.dataset.conftest import edit_dataset_json, make_tiny_dataset


def test_phantom_dataset_pairs_training_and_test_cases(phantom_small: Paths) -> None:
    spec = load_dataset(phantom_small.raw / "Dataset999_Phantom")
    assert (len(spec.cases), len(spec.test_cases), spec.num_training) == (8, 2, 8)
    case = spec.case("phantom_003")
    assert [p.name for p in case.images] == ["phantom_003_0000.nii.gz"]
    assert case.label is not None and case.label.name == "phantom_003.nii.gz"
    assert spec.test_cases[0].label is None
    assert (spec.foreground_labels, spec.num_classes) == ((1, 2), 3)


def test_two_channel_cases_keep_channel_order(paths: Paths) -> None:
    spec = load_dataset(make_tiny_dataset(paths.raw, num_channels=2))
    assert [p.name for p in spec.cases[1].images] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert spec.channel_names == {0: "CT", 1: "MR1"}


def test_collector_gathers_what_fail_fast_raises_first(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw)
    edit_dataset_json(root, numTraining=5)
    (root / "labelsTr/case_001.nii.gz").unlink()
    collector = ProblemCollector(fail_fast=False)
    spec = scan_dataset(root, collector)
    assert spec is not None and [c.case_id for c in spec.cases] == ["case_000", "case_002"]
    assert [e.where for e in collector.problems] == [str(root / "labelsTr/case_001.nii.gz"),
                                                     str(root / "dataset.json")]
    with pytest.raises(DatasetError) as first:
        load_dataset(root)
    assert not isinstance(first.value, DatasetErrors) and first.value.where == collector.problems[0].where


def test_read_dataset_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="missing dataset.json") as info:
        read_dataset_json(tmp_path)
    assert info.value.where == str(tmp_path / "dataset.json")
