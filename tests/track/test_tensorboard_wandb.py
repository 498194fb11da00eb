"""The same tiny fold tracked with TensorBoard (event files beside the fold) and W&B (offline, no account),
read back with their own parsers (`tests.track.readers`)."""

from __future__ import annotations

import pytest

from autoseg.common.jsonio import load_record
from autoseg.evaluate.summary import Summary
from autoseg.track.fold import TRACKING_FILE, TrackingRecord
from tests.track.conftest import fold_dir, log_records, train_tracked
from tests.track.readers import read_tensorboard_run, read_wandb_offline_run

pytest.importorskip("tensorboard", reason='needs the track extra: pip install -e ".[track]"')
wandb = pytest.importorskip("wandb", reason='needs the track extra: pip install -e ".[track]"')

ARTIFACTS = {"plans.json", "progress.png", "trainer_config.json", "training_log.jsonl", "summary.json"}


def test_tensorboard_fold_run(phantom) -> None:
    train_tracked(phantom, "tb_run", "tensorboard")
    folder = fold_dir(phantom, "tb_run")
    record = load_record(folder / TRACKING_FILE, TrackingRecord)
    assert record.run_id == str(folder / "tensorboard")
    run = read_tensorboard_run(folder / "tensorboard")
    logged = log_records(folder)
    assert run.scalars["train_loss"] == [(r["epoch"], pytest.approx(r["train_loss"])) for r in logged]
    assert [s for s, _ in run.scalars["pseudo_dice/organ"]] == [0, 1]
    assert [s for s, _ in run.scalars["lr"]] == [0, 1]
    summary = load_record(folder / "validation" / "summary.json", Summary)
    assert run.scalars["final/dice_mean"] == [(0, pytest.approx(summary.foreground_mean.dice))]
    assert run.scalars["final/dice/organ"] == [(0, pytest.approx(summary.mean[1].dice))]
    assert run.hparams["dataset"] == "Dataset999_Phantom" and run.hparams["trainer.epochs"] == 2.0
    assert run.hparams["variant"] == "tb_run"
    assert run.texts["status"] == ["FINISHED"] and run.texts["tag/autoseg.dataset"] == ["Dataset999_Phantom"]
    files = {p.name for p in (folder / "tensorboard" / "artifacts").rglob("*") if p.is_file()}
    assert files == ARTIFACTS
    assert run.images == ["artifacts/progress"]


def test_wandb_offline_fold_run(phantom, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_tracked(phantom, "wandb_run", "wandb:autoseg-tests")
    wandb.teardown()  # W&B's service writes the run's last records by the time it stops (at exit, or now)
    folder = fold_dir(phantom, "wandb_run")
    record = load_record(folder / TRACKING_FILE, TrackingRecord)
    (run_dir,) = (folder / "wandb").glob(f"offline-run-*-{record.run_id}")
    run = read_wandb_offline_run(run_dir)
    assert run.run_id == record.run_id and run.group == "Dataset999_Phantom"
    assert run.name == "Dataset999_Phantom/3d_fullres/wandb_run/fold_0"
    assert run.config["dataset"] == "Dataset999_Phantom" and run.config["trainer.epochs"] == "2"
    assert run.config["tag.autoseg.kind"] == "fold"
    logged = log_records(folder)
    epochs = [h for h in run.history if "train_loss" in h]
    assert [h["_step"] for h in epochs] == [0, 1]
    assert [h["train_loss"] for h in epochs] == pytest.approx([r["train_loss"] for r in logged])
    assert [h["pseudo_dice/organ"] for h in epochs] == pytest.approx([r["pseudo_dice"][0] for r in logged])
    summary = load_record(folder / "validation" / "summary.json", Summary)
    assert run.summary["final/dice_mean"] == pytest.approx(summary.foreground_mean.dice)
    assert run.summary["autoseg.status"] == "FINISHED" and run.exit_code == 0
    assert ARTIFACTS <= set(run.files)
    assert all((run_dir / "files" / name).is_file() and not (run_dir / "files" / name).is_symlink()
               for name in ARTIFACTS)
