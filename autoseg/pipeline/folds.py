"""A fold dir (``results/<ds>/<config>/<variant>/[seed_<s>/]fold_<k>/``): its files, its lock, what a run did.

The run is isolated in its fold dir: it writes nothing elsewhere and holds an exclusive
``.lock`` while it trains or validates, so two processes never work on the same fold. It
records what it used (``trainer_config.json``, ``plans.json``, ``dataset.json``) next to its
checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_bytes, atomic_write_text, save_record
from autoseg.common.locks import PidLock
from autoseg.common.paths import Paths, TrainingId, is_folder_name
from autoseg.planning.plans import Plan
from autoseg.track.fold import TRACKING_FILE
from autoseg.track.tensorboard_backend import LOG_DIR as TENSORBOARD_DIR
from autoseg.train import checkpoint as ckpt_files
from autoseg.train.checkpoint import Checkpoint, load_checkpoint, load_latest, remove_stale_temp_files
from autoseg.train.config import TrainerConfig
from autoseg.train.loop import LOG_FILE, PROGRESS_PNG

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
TRAINER_CONFIG_FILE = "trainer_config.json"
PLANS_COPY = "plans.json"
DATASET_JSON_COPY = "dataset.json"
VALIDATION_DIR = "validation"
RUN_OUTPUTS = (TRAINER_CONFIG_FILE, PLANS_COPY, DATASET_JSON_COPY, LOG_FILE, PROGRESS_PNG,
               ckpt_files.LATEST, ckpt_files.BEST, ckpt_files.FINAL, ckpt_files.PREVIOUS, TRACKING_FILE)
"""Files a run writes in its fold dir; ``force`` removes them (and validation/, tensorboard/) before starting
(a forced run is a new tracker run; W&B's offline runs in wandb/ stay until synced)."""


@dataclass(frozen=True)
class TrainResult:
    """What one `train_fold` call did."""

    training_id: TrainingId
    fold_dir: Path
    status: str
    """``trained``; ``already_finished`` when resuming a finished, validated run; ``validated`` when
    only the final validation ran (``validation_only``, or resuming a run killed while validating)."""
    epochs_completed: int
    best_ema_pseudo_dice: float | None
    final_ema_pseudo_dice: float | None
    validation_dir: Path | None = None
    """Where the full validation of the fold was written (None when skipped)."""


def parse_fold(text: str | int) -> int | str:
    """A fold from the command line: a non-negative integer or ``all``."""
    value = str(text).strip().lower()
    if value.isdigit():
        return int(value)
    if value == "all":
        return "all"
    raise AutosegError(f"fold must be a number (0, 1, ...) or 'all', got {text!r}", where="FOLD")


def check_training_id(tid: TrainingId) -> None:
    """Variant and config names become folder names: keep them plain."""
    for what, name in (("variant", tid.variant), ("configuration", tid.config)):
        if not is_folder_name(name):
            raise AutosegError(f"{what} name {name!r} must use letters, digits, '.', '_' or '-' only",
                               where=what)
    if isinstance(tid.fold, bool) or not (isinstance(tid.fold, int) and tid.fold >= 0 or tid.fold == "all"):
        raise AutosegError(f"fold must be a non-negative integer or 'all', got {tid.fold!r}", where="fold")


@contextlib.contextmanager
def fold_lock(fold_dir: Path) -> Iterator[None]:
    """Hold the exclusive `PidLock` on ``<fold_dir>/.lock`` (with our pid inside) while training.

    The kernel drops the lock when the holder dies, so a SIGKILLed run never leaves a stale
    lock; a live holder makes us refuse with its pid. Forked children (data-loader workers)
    close their copy of the descriptor at once, so they never keep the lock alive after us.
    """
    with PidLock(Path(fold_dir) / LOCK_FILE, "another process ({holder}) is training this fold"):
        yield


def prepare_fold_dir(fold_dir: Path, resume: bool, force: bool, is_main: bool) -> Checkpoint | None:
    """Check what is in the fold dir against resume/force; the checkpoint to continue from, if any.

    Call under the fold's lock (rank 0 only does anything; other ranks get None).
    """
    latest, final = fold_dir / ckpt_files.LATEST, fold_dir / ckpt_files.FINAL
    if not is_main:
        return None
    if resume and force:
        raise AutosegError("--continue and --force contradict each other; pick one", where=fold_dir)
    remove_stale_temp_files(fold_dir)  # we hold the fold's lock: their writers are dead
    existing = [p for p in (final, latest, fold_dir / ckpt_files.BEST) if p.is_file()]
    if resume:
        if final.is_file():
            rebuild = f"move it away and --continue rebuilds it from {latest.name}, or " if latest.is_file() else ""
            return load_checkpoint(final, hint=f"{rebuild}start over with --force")
        if latest.is_file() or (fold_dir / ckpt_files.PREVIOUS).is_file():
            return load_latest(fold_dir)
        log.info("no %s in %s; starting from scratch", ckpt_files.LATEST, fold_dir)
    elif existing and not force:
        raise AutosegError(f"{existing[0].name} exists; use --continue to resume or --force to start over",
                           where=fold_dir)
    if force:
        for name in RUN_OUTPUTS:
            (fold_dir / name).unlink(missing_ok=True)
        shutil.rmtree(fold_dir / VALIDATION_DIR, ignore_errors=True)
        shutil.rmtree(fold_dir / TENSORBOARD_DIR, ignore_errors=True)
    atomic_write_text(fold_dir / LOG_FILE, "")  # a fresh run starts a fresh log
    return None


def record_inputs(paths: Paths, dataset: str, fold_dir: Path, cfg: TrainerConfig, plan: Plan) -> None:
    """Copy what the run used next to its checkpoints (config, plan, raw dataset.json)."""
    save_record(fold_dir / TRAINER_CONFIG_FILE, cfg)
    save_record(fold_dir / PLANS_COPY, plan)
    raw_json = paths.raw_dataset(dataset) / "dataset.json"
    if raw_json.is_file():
        atomic_write_bytes(fold_dir / DATASET_JSON_COPY, raw_json.read_bytes())
    else:
        log.warning("%s not found; the fold dir will lack its copy of dataset.json", raw_json)
