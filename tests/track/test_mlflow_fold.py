"""A tiny phantom fold tracked in a local MLflow store, read back with MLflow's own client: params, one
value per epoch of every per-epoch metric, the final validation equal to summary.json, the artifacts;
an interrupted run ends KILLED and ``--continue`` resumes the same run; a failing one ends FAILED."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import autoseg.cli
import autoseg.pipeline.run
from autoseg.common.jsonio import load_record
from autoseg.evaluate.summary import Summary
from autoseg.planning.plans import Plan
from autoseg.track.fold import TRACKING_FILE, TrackingRecord, plan_digest
from autoseg.track.readback import MlflowReader
from autoseg.track.spec import TrackSpec
from tests.track.conftest import DATASET, fold_dir, log_records, tiny_sets, train_tracked

pytest.importorskip("mlflow", reason='needs the track extra: pip install -e ".[track]"')

EPOCH_SERIES = {"train_loss": "train_loss", "val_loss": "val_loss", "lr": "lr", "epoch_time_s": "epoch_time_s",
                "pseudo_dice_mean": "mean_pseudo_dice", "ema_pseudo_dice": "ema_pseudo_dice"}


def _reader(folder: Path) -> MlflowReader:
    return MlflowReader(TrackSpec("mlflow", f"sqlite:///{folder / 'mlflow.db'}"))


def _run_of(reader: MlflowReader, folder: Path):  # type: ignore[no-untyped-def]
    record = load_record(folder / TRACKING_FILE, TrackingRecord)
    runs = [r for r in reader.runs(DATASET) if r.run_id == record.run_id]
    assert len(runs) == 1
    return record, runs[0]


def test_fold_run_params_metrics_final_dice_and_artifacts(phantom, mlflow_folder) -> None:
    train_tracked(phantom, "mlflow_run", f"mlflow:{mlflow_folder}")
    folder = fold_dir(phantom, "mlflow_run")
    reader = _reader(mlflow_folder)
    record, run = _run_of(reader, folder)
    assert run.status == "FINISHED" and record.experiment == DATASET
    assert run.name == f"{DATASET}/3d_fullres/mlflow_run/fold_0"
    p = run.params
    assert (p["dataset"], p["configuration"], p["fold"], p["variant"], p["plans"]) == (
        DATASET, "3d_fullres", "0", "mlflow_run", "default")
    assert (p["trainer.epochs"], p["trainer.iterations_per_epoch"], p["trainer.lr"], p["trainer.augment.mirror"]) == (
        "2", "2", "0.01", "False")
    assert p["plans.digest"] == plan_digest(load_record(folder / "plans.json", Plan))
    assert p["device"] == "cpu" and int(p["data_workers"]) >= 0 and int(p["cpu_share"]) >= 1
    assert "env.CUDA_VISIBLE_DEVICES" in p and p["autoseg.version"] and p["autoseg.commit"]
    assert run.tags["autoseg.dataset"] == DATASET and run.tags["autoseg.kind"] == "fold"

    logged = log_records(folder)
    assert len(logged) == 2
    for metric, key in EPOCH_SERIES.items():
        assert reader.history(run.run_id, metric) == [(r["epoch"], pytest.approx(r[key])) for r in logged], metric
    for i, name in enumerate(("organ", "lesion")):
        assert [v for _, v in reader.history(run.run_id, f"pseudo_dice/{name}")] == pytest.approx(
            [r["pseudo_dice"][i] for r in logged])
    assert [v for _, v in reader.history(run.run_id, "samples_per_s")] == pytest.approx(
        [r["iterations_per_s"] * 2 for r in logged])

    summary = load_record(folder / "validation" / "summary.json", Summary)
    assert run.metrics["final/dice_mean"] == pytest.approx(summary.foreground_mean.dice, abs=1e-12)
    for value, name in ((1, "organ"), (2, "lesion")):
        assert run.metrics[f"final/dice/{name}"] == pytest.approx(summary.mean[value].dice, abs=1e-12)
        assert run.metrics[f"final/iou/{name}"] == pytest.approx(summary.mean[value].iou, abs=1e-12)
        assert run.metrics[f"final/nsd/{name}"] == pytest.approx(summary.mean[value].nsd, abs=1e-12)
    assert run.metrics["epochs_completed"] == 2
    assert reader.artifacts(run.run_id) == ["plans.json", "progress.png", "trainer_config.json",
                                            "training_log.jsonl", "validation/summary.json"]


def _interrupt_after_first_epoch(folder: Path) -> threading.Thread:
    """SIGINT to this process once the fold has logged its first epoch (the trainer checkpoints and stops)."""
    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            log = folder / "training_log.jsonl"
            if log.is_file() and log.read_text(encoding="utf-8").count("\n") >= 1:
                signal.raise_signal(signal.SIGINT)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_interrupted_run_ends_killed_and_continue_resumes_the_same_run(phantom, mlflow_folder) -> None:
    folder = fold_dir(phantom, "mlflow_resumed")
    roots = ["--raw", str(phantom.raw), "--preprocessed", str(phantom.preprocessed), "--results", str(phantom.results)]
    args = [*roots, "train", "999", "3d_fullres", "0", "--variant", "mlflow_resumed", "--quiet", "--device", "cpu",
            "--track", f"mlflow:{mlflow_folder}", *tiny_sets("epochs=3")]
    previous = signal.signal(signal.SIGINT, lambda *a: None)  # a late signal must never reach pytest
    try:
        watcher = _interrupt_after_first_epoch(folder)
        first = CliRunner().invoke(autoseg.cli.cli, args, catch_exceptions=False)
        watcher.join(5)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert first.exit_code == 130, first.output
    reader = _reader(mlflow_folder)
    record, run = _run_of(reader, folder)
    assert run.status == "KILLED" and run.tags["error"].startswith("TrainingInterrupted: interrupted")
    done = len(log_records(folder))
    assert 1 <= done < 3

    second = CliRunner().invoke(autoseg.cli.cli, [*args, "--continue"], catch_exceptions=False)
    assert second.exit_code == 0, second.output
    again, run = _run_of(reader, folder)
    assert again.run_id == record.run_id and run.status == "FINISHED"
    assert [s for s, _ in reader.history(run.run_id, "train_loss")] == [0, 1, 2]
    assert len([r for r in reader.runs(DATASET) if r.name == run.name]) == 1

    (folder / "validation" / "summary.json").unlink()  # as if killed while validating: --continue validates
    third = CliRunner().invoke(autoseg.cli.cli, [*args, "--continue"], catch_exceptions=False)
    assert third.exit_code == 0 and "validated" in third.output, third.output
    _, run = _run_of(reader, folder)
    assert run.status == "FINISHED" and "final/dice_mean" in run.metrics
    assert len([r for r in reader.runs(DATASET) if r.name == run.name]) == 1


def test_a_failing_fold_ends_failed_with_the_error_line(phantom, mlflow_folder, monkeypatch) -> None:
    def broken_validation(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("validation exploded\nsecond line")

    monkeypatch.setattr(autoseg.pipeline.run, "validate_fold", broken_validation)
    roots = ["--raw", str(phantom.raw), "--preprocessed", str(phantom.preprocessed), "--results", str(phantom.results)]
    result = CliRunner().invoke(autoseg.cli.cli, [*roots, "train", "999", "3d_fullres", "0", "--variant", "mlflow_fail",
                                                  "--quiet", "--device", "cpu", "--track", f"mlflow:{mlflow_folder}",
                                                  *tiny_sets("epochs=1")])
    assert isinstance(result.exception, RuntimeError)
    _, run = _run_of(_reader(mlflow_folder), fold_dir(phantom, "mlflow_fail"))
    assert run.status == "FAILED" and run.tags["error"] == "RuntimeError: validation exploded"
    assert [s for s, _ in _reader(mlflow_folder).history(run.run_id, "train_loss")] == [0]
