"""Fixtures of the tracking tests: one planned, preprocessed phantom shared by the session, tiny trainings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoseg.common.paths import Paths
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from tests.helpers import run_cli_ok

DATASET = "Dataset999_Phantom"
TINY = ("epochs=2", "iterations_per_epoch=2", "val_iterations=1", "batch_size=2", "augment.mirror=false")
"""Two epochs of two steps, one validation batch, no test-time mirroring: every file, in seconds."""


def tiny_sets(*extra: str) -> list[str]:
    return [a for kv in (*TINY, *extra) for a in ("--set", kv)]


@pytest.fixture(scope="session")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """A 4-case phantom, planned and preprocessed once for every tracking test (trainings use own variants)."""
    paths = Paths.under(tmp_path_factory.mktemp("track_phantom"))
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=4, num_test=0, shape=(8, 24, 24), shape_jitter=0))
    for step in ("plan", "preprocess"):
        run_cli_ok(paths, step, "999", "--configs", "3d_fullres")
    return paths


@pytest.fixture(scope="session")
def mlflow_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One local MLflow store for the session (a new one costs seconds of schema migrations)."""
    return tmp_path_factory.mktemp("mlflow_store")


def train_tracked(paths: Paths, variant: str, track: str, *args: str) -> str:
    """``autoseg train 999 3d_fullres 0 --variant VARIANT --track TRACK`` with the tiny schedule, in-process."""
    return run_cli_ok(paths, "train", "999", "3d_fullres", "0", "--variant", variant, "--quiet", "--device", "cpu",
                      "--track", track, *tiny_sets(), *args)


def fold_dir(paths: Paths, variant: str) -> Path:
    return paths.results / DATASET / "3d_fullres" / variant / "fold_0"


def log_records(folder: Path) -> list[dict]:
    return [json.loads(s) for s in (folder / "training_log.jsonl").read_text(encoding="utf-8").splitlines()]
