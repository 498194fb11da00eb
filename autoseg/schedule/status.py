"""What ``autoseg status`` shows: each job's state, GPU, CPU share, progress, ETA, last pseudo-Dice and log.

Reads the state store read-only (safe while ``train-all`` runs) and each training's
``training_log.jsonl`` (one JSON object per epoch: epoch, epochs, mean_pseudo_dice, epoch_time_s).
The store keeps every job ever run under the results root; each row names the last run
(``train-all`` or ``sweep`` invocation) that took it, and by default only the latest run's
jobs are shown (`latest_run`), the others counted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from autoseg.common.paths import Paths
from autoseg.schedule.jobs import JobPaths, JobState
from autoseg.schedule.lock import scheduler_alive
from autoseg.schedule.store import JobRow, StateStore, db_path

TRAINING_LOG = "training_log.jsonl"
DRIVEN_BY_SCHEDULER = frozenset({"local", "inprocess"})
"""Executors whose jobs die with (or are stopped by) the scheduler; Slurm jobs outlive it."""
VALIDATION_SUMMARY = Path("validation") / "summary.json"
"""Where a fold's final validation writes its evaluation (autoseg.pipeline.folds.VALIDATION_DIR)."""
VALIDATION_PROGRESS = Path("validation") / "progress.json"
"""Cases done/total of a running final validation (autoseg.pipeline.validate.VALIDATION_PROGRESS)."""
ETA_EPOCH_WINDOW = 5
"""ETA = remaining epochs x mean time of the last few epochs (early epochs include compile/warm-up)."""


@dataclass(frozen=True)
class TrainingProgress:
    """Progress of one training, from its log."""

    epochs_done: int
    epochs_total: int | None
    eta_s: float | None
    last_pseudo_dice: float | None
    validation_dice: float | None = None
    """Mean foreground Dice of the final validation, once it has been written."""
    validation_cases: tuple[int, int] | None = None
    """(done, total) cases of the final validation while it runs; its ETA is then ``eta_s``."""


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
    run_id: int | None = None
    """The last run that took the job (None: recorded before runs were numbered)."""
    cpus: int | None = None
    """CPU cores of a running job's share (None when it is not running)."""
    workers: int | None = None
    """Data-loader workers (or processes) of a running job's share."""


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
    val_dice = _validation_dice(Path(training_dir) / VALIDATION_SUMMARY)
    cases = None
    if isinstance(total, int) and done >= total and val_dice is None:  # training over: the final validation's ETA
        cases, eta = _validation_progress(Path(training_dir) / VALIDATION_PROGRESS)
    return TrainingProgress(done, total if isinstance(total, int) else None, eta,
                            float(dice) if isinstance(dice, int | float) else None, val_dice, cases)


def _validation_progress(path: Path) -> tuple[tuple[int, int] | None, float | None]:
    """(done, total) and the remaining seconds at the mean time per finished case (None before the first)."""
    try:
        p = json.loads(path.read_text(encoding="utf-8"))
        done, total, spent = int(p["cases_done"]), int(p["cases_total"]), float(p["updated_at"]) - float(p["started_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    return (done, total), (spent / done * (total - done) if done > 0 else None)


def _validation_dice(summary: Path) -> float | None:
    try:
        value = json.loads(summary.read_text(encoding="utf-8"))["foreground_mean"]["dice"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not validated yet (or being written right now)
    return float(value) if isinstance(value, int | float) else None


def job_status(paths: Paths, row: JobRow, now: float | None = None, scheduler_running: bool = True) -> JobStatus:
    """The status row of one stored job.

    A local job stored as running while no scheduler holds the results root was orphaned by a
    killed ``train-all``: it is shown as interrupted (the next run resumes it), its ETA dropped.
    """
    tid = row.spec.training_id()
    progress = read_training_progress(paths.training_dir(tid)) if tid is not None else None
    now = time.time() if now is None else now
    state = row.state
    if state is JobState.RUNNING and not scheduler_running and row.executor in DRIVEN_BY_SCHEDULER:
        state, now = JobState.INTERRUPTED, row.updated_at
        if progress is not None:
            progress = dataclasses.replace(progress, eta_s=None)
    elapsed = None
    if row.started_at is not None:
        elapsed = (row.ended_at if row.ended_at and state is not JobState.RUNNING else now) - row.started_at
    running = state is JobState.RUNNING
    return JobStatus(job_id=row.job_id, state=state, gpu=row.gpu, attempt=row.attempt, progress=progress,
                     elapsed_s=elapsed, log_path=row.log_path or str(JobPaths.of(paths, row.job_id).log),
                     external_id=row.external_id, message=row.message, run_id=row.run_id,
                     cpus=row.cpus if running else None, workers=row.workers if running else None)


def collect_status(paths: Paths) -> list[JobStatus]:
    """Every job the scheduler knows about under this results root ([] when it never ran here)."""
    if not db_path(paths).is_file():
        return []
    with StateStore.open(paths, readonly=True) as store:
        rows = store.rows()
    alive = scheduler_alive(paths)
    return [job_status(paths, row, scheduler_running=alive) for row in rows]


def latest_run(statuses: list[JobStatus]) -> tuple[list[JobStatus], list[JobStatus]]:
    """(the jobs of the latest run, the jobs of earlier ones); a store without run numbers is one run."""
    latest = max((s.run_id for s in statuses if s.run_id is not None), default=None)
    shown = [s for s in statuses if s.run_id == latest]
    return shown, [s for s in statuses if s.run_id != latest]
