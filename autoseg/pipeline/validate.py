"""The final validation of one fold: full-resolution predictions, then metrics.

The fold run calls `validate_fold` with its network after the last epoch, and
`validate_finished` with ``checkpoint_final.pt``'s network to (re)validate a trained fold
(``--validation-only``, or resuming a run killed while validating); both go through
`run_validation`, which `validation_complete` checks the outputs of. Every validation
case is predicted from its RAW image with exactly the `predict` code path (preprocessing,
sliding window, TTA, reverting to the original geometry), written to ``out_dir``
(``fold_k/validation/CASE<ending>``) and evaluated against the raw label, giving
``out_dir/summary.json``. With ``save_probabilities`` the softmax maps are kept too
(``CASE.npz`` + ``CASE.json``), which `find_best` needs to evaluate ensembles.

Cascade: when the plan has a configuration whose previous stage is this one (3d_lowres ->
3d_cascade_fullres), each validation case's prediction is also exported on that stage's
preprocessed grid (``out_dir/next_stage/<next config>/CASE.npy``, `autoseg.infer.cascade`).
A cascade fold validates with ``previous_stage`` (those exports of its validation cases).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_json, load_record, save_record
from autoseg.common.paths import Paths, TrainingId
from autoseg.common.progress import progress
from autoseg.dataset.io import write_image
from autoseg.dataset.spec import load_dataset
from autoseg.evaluate.summary import SUMMARY_FILE, Summary, evaluate_pairs
from autoseg.data.augment import training_mirror_axes
from autoseg.infer.cascade import (
    export_for_next_stage,
    next_stage_file,
    next_stages,
    previous_stage_exports,
    write_next_stage,
)
from autoseg.infer.predict import (
    LoadedModel,
    PredictOptions,
    PreviousStage,
    labels_from_probabilities,
    load_model,
    model_input,
    model_logits,
    prepare_case,
    resolve_device,
    reverted_probabilities,
    write_probabilities,
)
from autoseg.pipeline.folds import PLANS_COPY, VALIDATION_DIR, TrainResult
from autoseg.planning.store import load_plan_file
from autoseg.planning.plans import Configuration, Plan
from autoseg.splits import fold_cases, load_splits
from autoseg.train import checkpoint as ckpt_files
from autoseg.train.checkpoint import load_checkpoint
from autoseg.train.config import TrainerConfig

log = logging.getLogger(__name__)

VALIDATION_PROGRESS = "progress.json"
"""``out_dir/progress.json``: cases done/total and timestamps, so `autoseg status` can give the
final validation (often longer than the training on small budgets) its own ETA."""


def run_validation(net: nn.Module, plan: Plan, config: Configuration, mirror_axes: Sequence[int],
                   case_ids: Sequence[str], paths: Paths, dataset: str, out_dir: Path,
                   device: str | torch.device = "cpu", save_probabilities: bool = False,
                   options: PredictOptions = PredictOptions(), show_progress: bool = True,
                   previous_stage: PreviousStage | None = None) -> Summary:
    """Predict the fold's validation cases from the raw images, evaluate them, write summary.json.

    ``previous_stage`` is required for a cascade configuration (its extra input channels).
    """
    spec = load_dataset(paths.raw_dataset(dataset))
    if not case_ids:
        raise AutosegError("fold has no validation cases", out_dir)
    cases = [spec.case(cid) for cid in case_ids]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = getattr(net, "_orig_mod", net)
    was_training, had_ds = net.training, getattr(base, "deep_supervision", None)
    if had_ds is not None:
        base.deep_supervision = False
    net.eval()
    model = LoadedModel(nets=[net], plan=plan, config=config, mirror_axes=tuple(mirror_axes),
                        device=resolve_device(device), previous_stage=previous_stage)
    exports = next_stages(plan, config.name)
    pairs = []
    started = time.time()
    _write_progress(out_dir, 0, len(cases), started)
    try:
        for case in progress(cases, total=len(cases), desc="validation", enabled=show_progress, unit="case"):
            # predict_case's steps, keeping the logits on the preprocessed grid for the exports
            prepared = prepare_case([model], case.images, case_id=case.case_id)
            props, geometry = prepared.inputs[0][1], prepared.geometry
            grid_logits = model_logits(model, model_input(model, prepared, 0, options), options).numpy()
            probs = reverted_probabilities(model, grid_logits, props)
            seg = labels_from_probabilities(probs, plan.label_scheme)
            for nxt in exports:  # nnU-Net resamples the logits to the next stage's grid, then takes the argmax
                write_next_stage(next_stage_file(out_dir, nxt.name, case.case_id),
                                 export_for_next_stage(grid_logits, props, plan, nxt))
            out = out_dir / f"{case.case_id}{spec.file_ending}"
            if save_probabilities:
                write_probabilities(out_dir, case.case_id, probs, geometry, spec.labels, spec.file_ending,
                                    regions_class_order=plan.regions_class_order)
            write_image(out, seg, geometry)
            pairs.append((case.case_id, out, case.label))
            _write_progress(out_dir, len(pairs), len(cases), started)
    finally:
        net.train(was_training)
        if had_ds is not None:
            base.deep_supervision = had_ds
    summary = evaluate_pairs(pairs, spec.labels, show_progress=False)
    save_record(out_dir / SUMMARY_FILE, summary)
    log.info("validation of %d case(s): mean foreground Dice %.4f", len(pairs), summary.foreground_dice)
    return summary


def _write_progress(out_dir: Path, done: int, total: int, started: float) -> None:
    atomic_write_json(out_dir / VALIDATION_PROGRESS,
                      {"cases_done": done, "cases_total": total, "started_at": started, "updated_at": time.time()})


def previous_stage_of(exports: dict[str, Path], case_ids: Sequence[str]) -> PreviousStage | None:
    """The CV exports of ``case_ids`` as a validation's previous-stage source (None without a cascade)."""
    if not exports:
        return None
    return PreviousStage(exports={c: exports[c] for c in case_ids})


@dataclass(frozen=True)
class FoldValidation:
    """Which fold to validate (its dir: ``paths.training_dir(tid)``), on which device, and what to keep."""

    paths: Paths
    tid: TrainingId
    device: torch.device
    save_probabilities: bool = False
    """Keep the softmax maps (``CASE.npz`` + ``CASE.json``), which `find_best` needs for ensembles."""
    show_progress: bool = True

    @property
    def fold_dir(self) -> Path:
        return self.paths.training_dir(self.tid)

    def previous_stage(self, plan: Plan, val_ids: Sequence[str]) -> PreviousStage | None:
        """A cascade fold's previous-stage source for its validation cases (None otherwise)."""
        return previous_stage_of(previous_stage_exports(self.paths, self.tid, plan), val_ids)


def validate_fold(job: FoldValidation, net: nn.Module, plan: Plan, cfg: TrainerConfig) -> Path:
    """Sliding-window prediction and metrics of the fold's validation cases with the trained ``net``
    (nnU-Net's final validation); ``final_validation=no_mirroring`` leaves out the test-time mirroring."""
    config = plan.configuration(job.tid.config)
    _, val_ids = fold_cases(load_splits(job.paths, job.tid.dataset), job.tid.fold)
    out_dir = job.fold_dir / VALIDATION_DIR
    net.deep_supervision = False
    net.eval()
    mirror_axes = () if cfg.final_validation == "no_mirroring" else training_mirror_axes(config, cfg.augment)
    run_validation(net, plan, config, mirror_axes, val_ids, job.paths, job.tid.dataset, out_dir, job.device,
                   save_probabilities=job.save_probabilities, show_progress=job.show_progress,
                   previous_stage=job.previous_stage(plan, val_ids))
    return out_dir


def validation_complete(paths: Paths, tid: TrainingId, fold_dir: Path, with_probabilities: bool) -> bool:
    """The fold's validation finished (summary.json is written last), with probabilities if asked,
    and with the exports every next stage of the run's plan needs (a cascade's previous stage)."""
    out_dir = fold_dir / VALIDATION_DIR
    if not (out_dir / SUMMARY_FILE).is_file():
        return False
    nexts = next_stages(load_plan_file(fold_dir / PLANS_COPY), tid.config) if (fold_dir / PLANS_COPY).is_file() else []
    if not with_probabilities and not nexts:
        return True
    _, val_ids = fold_cases(load_splits(paths, tid.dataset), tid.fold)
    if not all(next_stage_file(out_dir, n.name, c).is_file() for n in nexts for c in val_ids):
        return False
    return not with_probabilities or all((out_dir / f"{cid}.json").is_file() for cid in val_ids)  # sidecar after npz


def validate_finished(job: FoldValidation, mirroring: bool = True) -> TrainResult:
    """Validate with ``checkpoint_final.pt``'s network (the same code path as the end of training),
    with the model's test-time mirroring unless ``mirroring`` is False (``final_validation=no_mirroring``).

    The previous validation folder is replaced only once the new one is complete.
    """
    fold_dir = job.fold_dir
    ckpt = load_checkpoint(fold_dir / ckpt_files.FINAL, hint="retrain this fold with --force")
    model = load_model([fold_dir], job.device, checkpoint="final")
    _, val_ids = fold_cases(load_splits(job.paths, job.tid.dataset), job.tid.fold)
    final_dir = fold_dir / VALIDATION_DIR
    staging = fold_dir / f".{VALIDATION_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    run_validation(model.nets[0], model.plan, model.config, model.mirror_axes if mirroring else (), val_ids,
                   job.paths, job.tid.dataset, staging, job.device, save_probabilities=job.save_probabilities,
                   show_progress=job.show_progress, previous_stage=job.previous_stage(model.plan, val_ids))
    _point_summary_at(staging, final_dir)
    old = fold_dir / f".{VALIDATION_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final_dir.exists():
        final_dir.rename(old)
    staging.rename(final_dir)
    shutil.rmtree(old, ignore_errors=True)
    last = ckpt.history[-1]["ema_pseudo_dice"] if ckpt.history else None
    return TrainResult(job.tid, fold_dir, "validated", ckpt.epoch, ckpt.best_ema_pseudo_dice, last, final_dir)


def _point_summary_at(staging: Path, final_dir: Path) -> None:
    """Rewrite the staged summary.json's prediction paths to where the rename will put them."""
    summary = load_record(staging / SUMMARY_FILE, Summary)
    cases = tuple(dataclasses.replace(c, prediction=str(final_dir / Path(c.prediction).relative_to(staging)))
                  if Path(c.prediction).is_relative_to(staging) else c for c in summary.cases)
    save_record(staging / SUMMARY_FILE, dataclasses.replace(summary, cases=cases))
