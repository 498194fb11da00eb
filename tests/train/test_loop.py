"""The training loop on a tiny network and synthetic batches: learning, files, stop and resume."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import torch

from autoseg.train.checkpoint import load_checkpoint
from autoseg.train.config import TrainerConfig
from autoseg.train.loop import TrainingInterrupted, fit, tp_fp_fn
from tests.train.conftest import cpu_runtime, make_setup

LOG_KEYS = {"epoch", "epochs", "train_loss", "val_loss", "pseudo_dice", "ema_pseudo_dice", "lr",
            "epoch_time_s", "iterations_per_s", "data_wait_fraction", "train_cpu_s", "augment_device", "timestamp"}


class StopAfter:
    """Wraps a batch stream and requests a stop once ``n`` batches were drawn (like a SIGTERM)."""

    def __init__(self, inner, n: int, stop: threading.Event) -> None:
        self.inner, self.n, self.stop, self.drawn = inner, n, stop, 0

    def __next__(self):
        self.drawn += 1
        if self.drawn >= self.n:
            self.stop.set()
        return next(self.inner)


def test_fit_learns_and_writes_its_files(tmp_path) -> None:
    cfg = TrainerConfig(epochs=4, iterations_per_epoch=6, val_iterations=2, lr=0.01)
    result = fit(make_setup(tmp_path, cfg), cpu_runtime())
    lines = [json.loads(s) for s in (tmp_path / "training_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3] and LOG_KEYS <= set(lines[0])
    assert len(lines[0]["pseudo_dice"]) == 2  # one per foreground class
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert lines[1]["lr"] < lines[0]["lr"] == pytest.approx(0.01)
    assert result.epochs_completed == 4 and result.best_ema_pseudo_dice is not None
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "progress.png"):
        assert (tmp_path / name).is_file(), name
    final = load_checkpoint(tmp_path / "checkpoint_final.pt")
    assert final.epoch == 4 and len(final.history) == 4
    assert final.best_ema_pseudo_dice == result.best_ema_pseudo_dice


def test_stop_saves_latest_and_resume_continues(tmp_path) -> None:
    cfg = TrainerConfig(epochs=4, iterations_per_epoch=4, val_iterations=1, optimizer="adamw", lr=1e-3)
    stop = threading.Event()
    setup = make_setup(tmp_path, cfg)
    setup.train_batches = StopAfter(setup.train_batches, 2 * 4 + 1, stop)  # 1 step into epoch 2
    with pytest.raises(TrainingInterrupted) as info:
        fit(setup, cpu_runtime(), stop=stop)
    assert info.value.epoch == 2
    latest = load_checkpoint(tmp_path / "checkpoint_latest.pt")
    assert latest.epoch == 2 and [r["epoch"] for r in latest.history] == [0, 1]
    assert not (tmp_path / "checkpoint_final.pt").exists()

    resumed = fit(make_setup(tmp_path, cfg, seed=7), cpu_runtime(), resume=latest)
    assert resumed.epochs_completed == 4
    final = load_checkpoint(tmp_path / "checkpoint_final.pt")
    assert [r["epoch"] for r in final.history] == [0, 1, 2, 3]
    steps = {float(s["step"]) for s in final.optimizer_state["state"].values()}
    assert steps == {2 * 4 + 1 + 2 * 4}  # AdamW step counters continued, not restarted
    lines = (tmp_path / "training_log.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [0, 1, 2, 3]


def test_without_deep_supervision(tmp_path) -> None:
    cfg = TrainerConfig(epochs=1, iterations_per_epoch=2, val_iterations=1, deep_supervision=False, loss="dice")
    result = fit(make_setup(tmp_path, cfg), cpu_runtime())
    assert result.epochs_completed == 1 and len(result.history[0]["pseudo_dice"]) == 2


def test_tp_fp_fn_counts() -> None:
    pred = torch.tensor([[0, 1, 1, 2, 2, 0]])
    ref = torch.tensor([[0, 1, 2, 2, 0, 1]])
    counts = tp_fp_fn(pred, ref, 3)
    assert counts.tolist() == [[1, 1], [1, 1], [1, 1]]


class SignalAfter:
    """Sends this process SIGTERM once ``n`` batches were drawn (what the scheduler does to stop a child)."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n, self.drawn = inner, n, 0

    def __next__(self):
        self.drawn += 1
        if self.drawn == self.n:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)


def test_sigterm_finishes_the_step_and_saves_latest(tmp_path) -> None:
    from autoseg.pipeline.isolation import stop_on_signals

    cfg = TrainerConfig(epochs=3, iterations_per_epoch=3, val_iterations=1)
    setup = make_setup(tmp_path, cfg)
    setup.train_batches = SignalAfter(setup.train_batches, 3 + 2)  # during epoch 1
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info, stop_on_signals() as stop:
        fit(setup, cpu_runtime(), stop=stop)
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    assert info.value.epoch == 1 and setup.train_batches.drawn == 5  # stopped right after that step
    assert load_checkpoint(tmp_path / "checkpoint_latest.pt").epoch == 1
