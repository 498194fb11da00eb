"""The end-of-training validation of one fold: full-resolution predictions, then metrics.

The trainer calls `run_validation` with its network after the last epoch. Every validation
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

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_json, save_record
from autoseg.common.paths import Paths
from autoseg.common.progress import progress
from autoseg.dataset.io import write_image
from autoseg.dataset.spec import load_dataset
from autoseg.evaluate.summary import SUMMARY_FILE, Summary, evaluate_pairs
from autoseg.infer.cascade import PreviousStage, export_for_next_stage, next_stage_file, next_stages, write_next_stage
from autoseg.infer.predict import (
    LoadedModel,
    PredictOptions,
    labels_from_probabilities,
    model_input,
    model_probabilities,
    prepare_case,
    resolve_device,
    write_probabilities,
)
from autoseg.planning.plans import Configuration, Plan

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
    from autoseg.preprocess import revert_preprocessing

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
            # predict_case's steps, keeping the probabilities on the preprocessed grid for the exports
            prepared = prepare_case([model], case.images, case_id=case.case_id)
            props, geometry = prepared.inputs[0][1], prepared.geometry
            grid_probs = model_probabilities(model, model_input(model, prepared, 0, options), options)
            probs = revert_preprocessing(grid_probs, props, plan, config).astype("float32", copy=False)
            seg = labels_from_probabilities(probs, plan.label_scheme)
            for nxt in exports:
                write_next_stage(next_stage_file(out_dir, nxt.name, case.case_id),
                                 export_for_next_stage(grid_probs, props, plan, nxt))
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
