"""`autoseg export-nnunet`: trained autoseg folds as an nnU-Net v2 results folder.

Writes ``OUT/<dataset>/nnUNetTrainer__<Plans>__<config>/`` with plans.json (`nnunet_plans`),
dataset.json and ``fold_<k>/checkpoint_<final|best>.pth``, so ``OUT`` works as nnUNet_results
for ``nnUNetv2_predict`` (or ``nnUNetPredictor.initialize_from_trained_model_folder``), which
then predicts the masks autoseg predicts. A checkpoint holds what nnUNetPredictor reads: the
weights under nnU-Net's names (`autoseg.infer.nnunet_keys`), the trainer name (plain
``nnUNetTrainer``: it builds the network from the plans), the configuration in ``init_args`` and
the test-time mirroring axes; no optimizer state, so nnU-Net cannot continue training from it.
Only tensors, numbers, strings and containers are saved (and a ``torch.device``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_json, read_json
from autoseg.common.paths import DEFAULT_PLANS, Paths, TrainingId
from autoseg.data.augment import training_mirror_axes
from autoseg.infer.model import checkpoint_file
from autoseg.infer.nnunet_keys import to_nnunet_state
from autoseg.infer.nnunet_plans import nnunet_dataset_json, nnunet_plans, plans_name_for
from autoseg.planning.plans import RESIDUAL_ENCODER
from autoseg.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

EXPORT_TRAINER = "nnUNetTrainer"
"""The trainer class nnUNetPredictor looks up to build the network (from plans.json)."""
CHECKPOINT_NAMES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
_LOG_KEYS = ("mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region", "train_losses", "val_losses", "lrs",
             "epoch_start_timestamps", "epoch_end_timestamps")
"""nnU-Net's training-log keys, written empty (the log lives in autoseg's training_log.jsonl)."""


@dataclass(frozen=True)
class NnunetExport:
    """What `export_nnunet` wrote."""

    trainer_dirs: tuple[Path, ...]
    folds: tuple[int | str, ...]
    notes: tuple[str, ...]


def _trained_folds(paths: Paths, tid: TrainingId, checkpoint: str) -> list[int | str]:
    root = paths.training_dir(tid).parent
    if not root.is_dir():
        raise AutosegError(f"configuration {tid.config_dirname!r} has no trained folds (variant {tid.variant!r})",
                           root)
    folds: list[int | str] = []
    for d in sorted(root.glob("fold_*")):
        name = d.name[len("fold_"):]
        if (d / f"checkpoint_{checkpoint}.pt").is_file():
            folds.append(int(name) if name.isdigit() else name)
    if not folds:
        raise AutosegError(f"no fold has checkpoint_{checkpoint}.pt", root)
    return sorted(folds, key=str)


def _dataset_json(paths: Paths, dataset: str, fold_dir: Path) -> dict | None:
    for candidate in (paths.raw_dataset(dataset) / "dataset.json", fold_dir / "dataset.json",
                      paths.results_dataset(dataset) / "dataset.json"):
        if candidate.is_file():
            return read_json(candidate)
    return None


def _export_config(paths: Paths, dataset: str, config: str, folds: Sequence[int | str], output: Path,
                   variant: str, checkpoint: str, plans: str, force: bool, notes: list[str]) -> Path:
    tid = TrainingId(dataset, config, 0, variant, plans=plans)
    folds = list(folds) or _trained_folds(paths, tid, checkpoint)
    ckpts = [load_checkpoint(checkpoint_file(paths.training_dir(TrainingId(dataset, config, f, variant, plans=plans)),
                                             checkpoint)) for f in folds]
    plan, cfg = ckpts[0].plan, ckpts[0].plan.configuration(ckpts[0].config_name)
    for f, c in zip(folds, ckpts):
        if c.plan != plan:
            raise AutosegError(f"fold {f} was trained with another plan than fold {folds[0]}; export them apart",
                               paths.training_dir(TrainingId(dataset, config, f, variant, plans=plans)))
    plans_name = plans_name_for(plan.preset)
    plans_dict = nnunet_plans(plan, plans_name)
    first_dir = paths.training_dir(TrainingId(dataset, config, folds[0], variant, plans=plans))
    dataset_json = nnunet_dataset_json(plan, _dataset_json(paths, dataset, first_dir))
    dest = Path(output) / dataset / f"{EXPORT_TRAINER}__{plans_name}__{tid.config}"
    if dest.exists() and not force:
        raise AutosegError("exists; use --force to replace it", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    mirror = tuple(training_mirror_axes(cfg, ckpts[0].trainer_config.augment))
    residual = cfg.encoder == RESIDUAL_ENCODER
    tmp = Path(tempfile.mkdtemp(prefix=f".export-{tid.config}-", dir=dest.parent))
    try:
        atomic_write_json(tmp / "plans.json", plans_dict)
        atomic_write_json(tmp / "dataset.json", dataset_json)
        for fold, ckpt in zip(folds, ckpts):
            (tmp / f"fold_{fold}").mkdir()
            payload = {
                "network_weights": to_nnunet_state(ckpt.model_state, residual),
                "trainer_name": EXPORT_TRAINER,
                "init_args": {"plans": plans_dict, "configuration": tid.config, "fold": fold,
                              "dataset_json": dataset_json, "device": torch.device("cpu")},
                "inference_allowed_mirroring_axes": mirror or None,  # nnU-Net reads an empty tuple as an error
                "current_epoch": int(ckpt.epoch), "_best_ema": ckpt.best_ema_pseudo_dice,
                "logging": {k: [] for k in _LOG_KEYS}, "optimizer_state": None, "grad_scaler_state": None,
            }
            torch.save(payload, tmp / f"fold_{fold}" / CHECKPOINT_NAMES[checkpoint])
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if cfg.previous_stage:
        notes.append(f"{tid.config} is a cascade stage: nnU-Net predicts it with --prev_stage_predictions of "
                     f"{cfg.previous_stage} (export that configuration too)")
    return dest


def export_nnunet(paths: Paths, dataset: str, configs: Sequence[str], output: Path,
                  folds: Sequence[int | str] = (), variant: str = "default", checkpoint: str = "final",
                  plans: str = DEFAULT_PLANS, force: bool = False) -> NnunetExport:
    """Write each configuration's folds (default: every fold with the checkpoint) as nnU-Net results."""
    if checkpoint not in CHECKPOINT_NAMES:
        raise AutosegError(f"checkpoint must be one of {', '.join(CHECKPOINT_NAMES)}, not {checkpoint!r}",
                           "--checkpoint")
    if not configs:
        raise AutosegError("give at least one configuration", "-c")
    notes: list[str] = []
    dirs = tuple(_export_config(paths, dataset, c, folds, Path(output), variant, checkpoint, plans, force, notes)
                 for c in configs)
    for note in notes:
        log.info("%s", note)
    exported = tuple(folds) or tuple(sorted({p.name[5:] for d in dirs for p in d.glob("fold_*")}))
    return NnunetExport(dirs, exported, tuple(notes))
