"""The two-stage cascade at inference: 3d_lowres predictions as input of 3d_cascade_fullres.

A cascade configuration (``Configuration.previous_stage`` set) takes, after the image
channels, one-hot channels of classes 1..K-1 of the previous stage's segmentation on its own
preprocessed grid. Where that segmentation comes from (`autoseg.infer.predict.PreviousStage`):

- cross-validation: each 3d_lowres fold's final validation exports its validation cases'
  predictions on the next stage's preprocessed grid (`export_for_next_stage`, files
  ``fold_k/validation/next_stage/<next config>/CASE.npy``, int8 (1, *spatial)); the cascade
  trains and validates on those, so it never sees a lowres prediction of a case that lowres
  model was trained on (nnU-Net's ``predicted_next_stage``);
- prediction: the lowres model (same variant and folds) predicts the case, the label map in
  the input's geometry is brought to the cascade grid like a label (`seg_to_preprocessed_grid`);
  or such label maps are read from a folder (``--prev-stage-predictions``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_with
from autoseg.common.paths import Paths, TrainingId
from autoseg.planning.plans import Configuration, Plan
from autoseg.preprocess import (
    CaseProperties,
    resample_data,
    resample_seg,
    resampled_shape,
    separate_axis,
    target_spacing,
)
from autoseg.splits import fold_cases, load_splits
from autoseg.train.checkpoint import FINAL

NEXT_STAGE_DIR = "next_stage"
"""Sub-folder of a fold's ``validation/`` holding the exports for the next stage(s)."""


def next_stages(plan: Plan, config_name: str) -> list[Configuration]:
    """The configurations of ``plan`` whose previous stage is ``config_name``."""
    return [c for c in plan.configurations.values() if c.previous_stage == config_name]


def next_stage_file(validation_dir: Path, next_config: str, case_id: str) -> Path:
    """``<validation_dir>/next_stage/<next_config>/<case_id>.npy``."""
    return Path(validation_dir) / NEXT_STAGE_DIR / next_config / f"{case_id}.npy"


def _transposed(values: tuple, plan: Plan) -> tuple:
    return tuple(values[a] for a in plan.transpose_forward)


def preprocessed_shape(props: CaseProperties, plan: Plan, config: Configuration) -> tuple[int, ...]:
    """The (transposed) shape ``config``'s preprocessing gives a case, from another configuration's properties.

    Every configuration crops the same nonzero box; only the target spacing differs.
    """
    spacing_t = _transposed(props.spacing_original, plan)
    return resampled_shape(_transposed(props.shape_after_crop, plan), spacing_t, target_spacing(config, spacing_t))


def export_for_next_stage(probabilities: np.ndarray, props: CaseProperties, plan: Plan,
                          next_config: Configuration) -> np.ndarray:
    """Logits or probabilities (K, *this grid) -> int8 (1, *next stage's grid) label map (resample, then argmax).

    Like nnU-Net (which passes logits), they are resampled from this configuration's preprocessed
    grid straight to the next stage's (same crop and transposition, another spacing), never
    through the original image grid.
    """
    shape = preprocessed_shape(props, plan, next_config)
    if tuple(shape) != tuple(probabilities.shape[1:]):
        new_spacing = target_spacing(next_config, _transposed(props.spacing_original, plan))
        axis = separate_axis(props.spacing_after_resampling, new_spacing)
        probabilities = resample_data(probabilities, tuple(shape), 1, axis)
    return np.argmax(probabilities, axis=0).astype(np.int8)[None]


def write_next_stage(path: Path, seg: np.ndarray) -> None:
    """Save an export atomically (a half-written file never looks finished)."""
    atomic_write_with(path, lambda f: np.save(f, seg))


def seg_to_preprocessed_grid(seg: np.ndarray, props: CaseProperties, plan: Plan,
                             config: Configuration) -> np.ndarray:
    """A (z, y, x) label map in the original geometry -> int8 (1, *spatial) on the case's preprocessed grid.

    The same crop, transposition and per-label resampling as training labels get.
    """
    if tuple(seg.shape) != tuple(props.shape_before_crop):
        raise AutosegError(f"previous-stage segmentation has shape {tuple(seg.shape)}, the image "
                           f"{tuple(props.shape_before_crop)}", props.case_id or None)
    box = tuple(slice(a, b) for a, b in props.bbox)
    cropped = np.ascontiguousarray(seg[box].transpose(plan.transpose_forward)).astype(np.int16)
    out = resample_seg(cropped, tuple(props.shape_after_resampling), list(range(plan.num_classes)),
                       config.resample_order_seg, props.separate_z_axis)
    return out.astype(np.int8)[None]


def previous_stage_exports(paths: Paths, tid: TrainingId, plan: Plan) -> dict[str, Path]:
    """Case id -> previous-stage export for every training case, for training a cascade fold.

    Needs every fold of the previous stage (same variant and seed) trained and validated with
    this plan's next stage; otherwise one error naming the missing folds.
    """
    prev = plan.configuration(tid.config).previous_stage
    if prev is None:
        return {}
    plan.configuration(prev)
    splits = load_splits(paths, tid.dataset)
    out: dict[str, Path] = {}
    missing = []
    for k in range(splits.n_folds):
        fold_dir = paths.training_dir(dataclasses.replace(tid, config=prev, fold=k))
        if not (fold_dir / FINAL).is_file():
            missing.append(f"{k} (not trained)")
            continue
        files = {c: next_stage_file(fold_dir / "validation", tid.config, c) for c in fold_cases(splits, k)[1]}
        absent = [c for c, f in files.items() if not f.is_file()]
        if absent:
            missing.append(f"{k} (no export for {len(absent)} validation case(s))")
        out.update(files)
    if missing:
        where = paths.training_dir(dataclasses.replace(tid, config=prev, fold=0)).parent
        raise AutosegError(f"{tid.config} needs every {prev} fold trained and validated first; missing fold(s) "
                           f"{', '.join(missing)}", where)
    return out
