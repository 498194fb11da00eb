"""What ``autoseg status`` shows: every job's state, GPU, progress, ETA, last pseudo-Dice and log.

Reads the state store read-only (safe while ``train-all`` runs) and each training's
``training_log.jsonl`` (one JSON object per epoch: epoch, epochs, mean_pseudo_dice, epoch_time_s).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from autoseg.common.paths import Paths
from autoseg.schedule.jobs import JobPaths, JobState
from autoseg.schedule.store import JobRow, StateStore, db_path

TRAINING_LOG = "training_log.jsonl"
ETA_EPOCH_WINDOW = 5
"""ETA = remaining epochs x mean time of the last few epochs (early epochs include compile/warm-up)."""


@dataclass(frozen=True)
class TrainingProgress:
    """Progress of one training, from its log."""

    epochs_done: int
    epochs_total: int | None
    eta_s: float | None
    last_pseudo_dice: float | None


@dataclass(frozen=True)
class JobStatus:
    """One row of ``autoseg status``."""

    job_id: str
    state: JobState
    gpu: str | None
    attempt: int
    progress: TrainingProgress | None
    elapsed_s: float | None
    log_path: str
    external_id: str | None
    message: str | None = None
    """Why a failed job failed, in its own words (a user error's ``error:`` line)."""


def read_training_progress(training_dir: Path) -> TrainingProgress | None:
    """Epochs done, total, ETA and the last mean pseudo-Dice from a training's log (None before epoch 1)."""
    path = Path(training_dir) / TRAINING_LOG
    if not path.is_file():
        return None
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    if not records:
        return None
    last = records[-1]
    done = int(last.get("epoch", len(records) - 1)) + 1
    total = last.get("epochs")
    times = [r["epoch_time_s"] for r in records[-ETA_EPOCH_WINDOW:] if isinstance(r.get("epoch_time_s"), int | float)]
    eta = (total - done) * sum(times) / len(times) if times and isinstance(total, int) else None
    dice = last.get("mean_pseudo_dice", last.get("ema_pseudo_dice"))
    return TrainingProgress(done, total if isinstance(total, int) else None, eta,
                            float(dice) if isinstance(dice, int | float) else None)


def job_status(paths: Paths, row: JobRow, now: float | None = None) -> JobStatus:
    """The status row of one stored job."""
    tid = row.spec.training_id()
    progress = read_training_progress(paths.training_dir(tid)) if tid is not None else None
    now = time.time() if now is None else now
    elapsed = None
    if row.started_at is not None:
        elapsed = (row.ended_at if row.ended_at and row.state is not JobState.RUNNING else now) - row.started_at
    return JobStatus(job_id=row.job_id, state=row.state, gpu=row.gpu, attempt=row.attempt, progress=progress,
                     elapsed_s=elapsed, log_path=row.log_path or str(JobPaths.of(paths, row.job_id).log),
                     external_id=row.external_id, message=row.message)


def collect_status(paths: Paths) -> list[JobStatus]:
    """Every job the scheduler knows about under this results root ([] when it never ran here)."""
    if not db_path(paths).is_file():
        return []
    with StateStore.open(paths, readonly=True) as store:
        return [job_status(paths, row) for row in store.rows()]
