"""Paths: environment precedence, dataset name resolution, training folder layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths, TrainingId, dataset_name


def test_env_precedence_ours_over_nnunet_over_default(tmp_path: Path) -> None:
    env = {"AUTOSEG_RAW": str(tmp_path / "ours"), "nnUNet_raw": str(tmp_path / "theirs"),
           "nnUNet_results": str(tmp_path / "nnres")}
    p = Paths.from_env(env, {"preprocessed": tmp_path / "cli"}, base=tmp_path)
    assert p.raw == tmp_path / "ours"
    assert p.preprocessed == tmp_path / "cli"
    assert p.results == tmp_path / "nnres"


def test_default_roots_under_project_datasets(tmp_path: Path) -> None:
    p = Paths.from_env({}, base=tmp_path)
    assert p.raw == tmp_path / "datasets" / "raw"
    assert p.results == tmp_path / "datasets" / "results"


def test_resolve_dataset_by_id_and_name(tmp_path: Path) -> None:
    p = Paths.under(tmp_path)
    (p.raw / "Dataset004_Hippocampus").mkdir(parents=True)
    for spelling in (4, "4", "004", "Dataset004", "Dataset004_Hippocampus"):
        assert p.resolve_dataset(spelling) == "Dataset004_Hippocampus"
    with pytest.raises(AutosegError, match="no dataset with id 005"):
        p.resolve_dataset("5")
    with pytest.raises(AutosegError, match="cannot understand"):
        p.resolve_dataset("Hippo")


def test_resolve_dataset_ambiguous_id(tmp_path: Path) -> None:
    p = Paths.under(tmp_path)
    (p.raw / "Dataset004_A").mkdir(parents=True)
    (p.raw / "Dataset004_B").mkdir(parents=True)
    with pytest.raises(AutosegError, match="ambiguous"):
        p.resolve_dataset(4)


def test_training_dir_layout_with_and_without_seed(tmp_path: Path) -> None:
    p = Paths.under(tmp_path)
    plain = TrainingId("Dataset004_Hippocampus", "3d_fullres", 0)
    seeded = TrainingId("Dataset004_Hippocampus", "3d_fullres", "all", variant="lr=0.003", seed=2)
    assert p.training_dir(plain) == p.results / "Dataset004_Hippocampus/3d_fullres/default/fold_0"
    assert p.training_dir(seeded) == p.results / "Dataset004_Hippocampus/3d_fullres/lr=0.003/seed_2/fold_all"


def test_dataset_name_validation() -> None:
    assert dataset_name(4, "Hippocampus") == "Dataset004_Hippocampus"
    with pytest.raises(AutosegError):
        dataset_name(1000, "X")
    with pytest.raises(AutosegError):
        dataset_name(3, "bad name")
