"""The fold run's tracker run: started with the fold, fed each epoch, ended with the fold's outcome.

`start_fold_tracking` opens the run (resuming the one in ``tracking.json`` when the fold resumes
from a checkpoint; a fold that starts over gets a new run) and logs the params; the training
loop's ``on_epoch`` hook (`FoldTracker.on_epoch`) queues each epoch's metrics; `FoldTracker.finish`
queues the final validation's metrics and the artifacts. `tracked` ends the run with the fold's
outcome: FINISHED, KILLED on an interrupt (``--continue`` resumes it), FAILED with the error line.
Only rank 0 tracks. Nothing here can stop training: see `autoseg.track.logger`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record, save_record
from autoseg.common.paths import TrainingId
from autoseg.evaluate.summary import SUMMARY_FILE, Summary
from autoseg.pipeline.folds import PLANS_COPY, TRAINER_CONFIG_FILE, VALIDATION_DIR, TrainResult
from autoseg.track.base import RunRequest, RunStatus
from autoseg.track.fold import (TRACKING_FILE, FoldFacts, TrackingRecord, class_names, epoch_metrics, final_metrics,
                                fold_params, run_name, run_tags)
from autoseg.track.logger import RunLogger, error_line
from autoseg.track.registry import open_run
from autoseg.track.spec import TrackRequest, load_same_tracker
from autoseg.train import checkpoint as ckpt_files
from autoseg.train.checkpoint import Checkpoint
from autoseg.train.loop import LOG_FILE, PROGRESS_PNG, FitResult, TrainingInterrupted

log = logging.getLogger(__name__)

ARTIFACTS = (PROGRESS_PNG, LOG_FILE, PLANS_COPY, TRAINER_CONFIG_FILE)
"""Fold-dir files every tracked run uploads at its end (plus validation/summary.json)."""


@dataclass
class FoldTracker:
    """The open tracker run of one fold."""

    logger: RunLogger
    request: TrackRequest
    fold_dir: Path
    classes: list[str]
    batch_size: int
    ended: bool = False

    def on_epoch(self, record: dict[str, Any]) -> None:
        """`autoseg.train.loop.FitSetup.on_epoch`: one epoch's line of training_log.jsonl as metrics."""
        try:
            metrics = epoch_metrics(record, self.classes, self.batch_size)
        except Exception as e:  # a malformed record must not reach the training loop
            log.warning("tracking: epoch %s not logged: %s", record.get("epoch"), error_line(e))
            return
        self.logger.log_metrics(metrics, step=int(record.get("epoch", 0)))

    def finish(self, result: FitResult, validation_dir: Path | None) -> None:
        """Queue the final validation's metrics (summary.json) and the artifacts."""
        metrics: dict[str, float | None] = {"epochs_completed": result.epochs_completed,
                                            "final/ema_pseudo_dice": result.final_ema_pseudo_dice,
                                            "best_ema_pseudo_dice": result.best_ema_pseudo_dice}
        summary_file = validation_dir / SUMMARY_FILE if validation_dir is not None else None
        if summary_file is not None and summary_file.is_file():
            try:
                metrics.update(final_metrics(load_record(summary_file, Summary)))
            except AutosegError as e:  # the fold's result stands; only its tracker copy is missing
                log.warning("tracking: final metrics not logged: %s", e)
            self.logger.log_artifact(summary_file, VALIDATION_DIR)
        self.logger.log_metrics(metrics)
        for name in ARTIFACTS:
            self.logger.log_artifact(self.fold_dir / name)
        if self.request.spec.checkpoints:
            self.logger.log_artifact(self.fold_dir / ckpt_files.FINAL, "checkpoints")

    def end(self, status: RunStatus, error: str | None = None) -> None:
        if not self.ended:
            self.ended = True
            report = self.logger.end(status, error)
            log.info("tracking (%s): run %s ended %s (%d event(s) sent, %d dropped)", self.request.spec.backend,
                     report.run_id, status.value, report.sent, report.dropped)


def start_fold_tracking(request: TrackRequest, facts: FoldFacts, fold_dir: Path, resumed: bool,
                        batch_size: int) -> FoldTracker | None:
    """Open the fold's run and queue its params; None when the tracker cannot be loaded (one warning)."""
    try:
        return _start(request, facts, fold_dir, resumed, batch_size)
    except Exception as e:  # whatever goes wrong here, the fold trains untracked
        log.warning("tracking (%s) is off for this fold: %s", request.spec.backend, error_line(e))
        return None


def tracked_validation(request: TrackRequest | None, ckpt: Checkpoint, fold_dir: Path, tid: TrainingId,
                       validate: Callable[[], TrainResult]) -> TrainResult:
    """Run ``validate`` for a fold whose training finished but whose validation did not (killed while
    validating): its tracker run, when it has one, is reopened for the final metrics and ended with them."""
    previous = _previous_run(fold_dir, request) if request is not None else None
    logger = None
    if request is not None and previous is not None:
        logger = open_run(request.spec, RunRequest(name=run_name(tid), experiment=request.context.experiment or "",
                                                   folder=fold_dir, resume_id=previous))
    tracker = None if logger is None or request is None else FoldTracker(logger, request, fold_dir,
                                                                          class_names(ckpt.plan), 1)
    with tracked(tracker):
        result = validate()
        if tracker is not None:
            last = ckpt.history[-1]["ema_pseudo_dice"] if ckpt.history else None
            tracker.finish(FitResult(ckpt.epoch, ckpt.best_ema_pseudo_dice, last, list(ckpt.history),
                                     fold_dir / ckpt_files.FINAL), result.validation_dir)
    return result


def _start(request: TrackRequest, facts: FoldFacts, fold_dir: Path, resumed: bool, batch_size: int) -> FoldTracker | None:
    spec, context, tid = request.spec, request.context, facts.tid
    previous = _previous_run(fold_dir, request) if resumed else None
    experiment = context.experiment or tid.dataset
    run = RunRequest(name=run_name(tid), experiment=experiment, folder=fold_dir, parent_id=context.parent_run_id,
                     resume_id=previous, tags=run_tags(tid, context.tags))

    def remember(run_id: str) -> None:  # in the logger's worker, once the tracker made the run
        save_record(fold_dir / TRACKING_FILE, TrackingRecord(spec.backend, spec.target, run_id, experiment, run.name))

    logger = open_run(spec, run, remember)
    if logger is None:
        return None
    logger.log_params(fold_params(facts))
    return FoldTracker(logger, request, fold_dir, class_names(facts.plan), batch_size)


def _previous_run(fold_dir: Path, request: TrackRequest | None) -> str | None:
    """The run id in ``tracking.json`` when it belongs to the same tracker (else a new run starts)."""
    if request is None:
        return None
    record = load_same_tracker(fold_dir / TRACKING_FILE, TrackingRecord, request.spec, "this fold's tracking")
    return record.run_id if record is not None else None


@contextlib.contextmanager
def tracked(tracker: FoldTracker | None) -> Iterator[FoldTracker | None]:
    """End ``tracker``'s run as the block ends: FINISHED, KILLED on an interrupt, FAILED with the error line."""
    if tracker is None:
        yield None
        return
    try:
        yield tracker
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        tracker.end(RunStatus.KILLED, error_line(e))
        raise
    except BaseException as e:
        tracker.end(RunStatus.FAILED, error_line(e))
        raise
    tracker.end(RunStatus.FINISHED)


def cpu_share() -> int:
    """The cores this process may run on (the scheduler pins each job to its share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
