"""train_fold's guards (lock, existing outputs, finished runs) and the CLI's error handling."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from autoseg.cli import cli
from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths, TrainingId
from autoseg.pipeline.folds import fold_lock, parse_fold
from autoseg.pipeline.run import train_fold
from autoseg.train.config import TrainerConfig
from autoseg.train.loop import fit
from tests.train.conftest import cpu_runtime, make_setup, tiny_plan

TID = TrainingId("Dataset990_Tiny", "3d_fullres", 0)


def _cli(paths: Paths, *args: str):
    return CliRunner().invoke(cli, ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
                                    "--results", str(paths.results), *args])


def test_a_live_lock_refuses_a_second_trainer(paths) -> None:
    fold_dir = paths.training_dir(TID)
    fold_dir.mkdir(parents=True)
    with fold_lock(fold_dir):
        with pytest.raises(AutosegError, match=r"another process \(pid \d+\) is training this fold"):
            train_fold(paths, TID, TrainerConfig(), tiny_plan(), device="cpu", quiet=True)
    with fold_lock(fold_dir):  # released again
        assert (fold_dir / ".lock").read_text(encoding="utf-8").strip().isdigit()


def test_existing_checkpoint_needs_continue_or_force(paths) -> None:
    fold_dir = paths.training_dir(TID)
    fold_dir.mkdir(parents=True)
    (fold_dir / "checkpoint_latest.pt").write_bytes(b"x")
    with pytest.raises(AutosegError, match="exists; use --continue to resume or --force"):
        train_fold(paths, TID, TrainerConfig(), tiny_plan(), device="cpu", quiet=True)
    with pytest.raises(AutosegError, match="contradict"):
        train_fold(paths, TID, TrainerConfig(), tiny_plan(), device="cpu", resume=True, force=True)
    assert (fold_dir / "checkpoint_latest.pt").read_bytes() == b"x"  # nothing was overwritten


def test_continue_on_a_finished_run_does_nothing(paths) -> None:
    fold_dir = paths.training_dir(TID)
    cfg = TrainerConfig(epochs=1, iterations_per_epoch=1, val_iterations=1)
    fit(make_setup(fold_dir, cfg), cpu_runtime())
    before = (fold_dir / "checkpoint_final.pt").stat().st_mtime_ns
    (fold_dir / "validation").mkdir()
    (fold_dir / "validation" / "summary.json").write_text("{}", encoding="utf-8")  # validated too
    result = train_fold(paths, TID, TrainerConfig(), None, device="cpu", resume=True, quiet=True)
    assert result.status == "already_finished" and result.epochs_completed == 1
    assert (fold_dir / "checkpoint_final.pt").stat().st_mtime_ns == before
    out = _cli(paths, "train", "Dataset990_Tiny", "3d_fullres", "0", "--continue", "--device", "cpu")
    assert out.exit_code == 0, out.output
    assert "already finished, 1 epochs" in out.output


def test_cli_user_errors_are_one_line(paths) -> None:
    (paths.raw / "Dataset990_Tiny").mkdir(parents=True)
    bad_key = _cli(paths, "train", "990", "3d_fullres", "0", "--set", "epoch=3")
    assert bad_key.exit_code == 2 and "error: epoch: unknown trainer key; did you mean 'epochs'" in bad_key.stderr
    bad_fold = _cli(paths, "train", "990", "3d_fullres", "five")
    assert bad_fold.exit_code == 2 and "error: FOLD: fold must be a number" in bad_fold.stderr
    bad_variant = _cli(paths, "train", "990", "3d_fullres", "0", "--variant", "../x")
    assert bad_variant.exit_code == 2 and "variant name '../x'" in bad_variant.stderr
    no_plan = _cli(paths, "train", "990", "3d_fullres", "0", "--device", "cpu")
    assert no_plan.exit_code == 2 and "run `autoseg plan Dataset990_Tiny` first" in no_plan.stderr


def test_parse_fold() -> None:
    assert parse_fold("3") == 3 and parse_fold("ALL") == "all" and parse_fold(0) == 0
    with pytest.raises(AutosegError):
        parse_fold("-1")
