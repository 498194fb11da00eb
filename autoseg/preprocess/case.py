"""One case through preprocessing and back: `preprocess_case` and `revert_preprocessing`.

Training and inference both call `preprocess_case` (a new image has no labels), so a network
sees the same arrays at test time as in training; `revert_preprocessing` puts its
probabilities back on the original grid. `CaseProperties` records what was done to a case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from autoseg.common.errors import AutosegError
from autoseg.dataset.io import Geometry
from autoseg.planning.plans import ChannelNormalization, Configuration, Plan
from autoseg.preprocess.steps import (crop_to_nonzero, normalize, resample_data, resample_seg, resampled_shape,
                                      sample_foreground, separate_axis, target_spacing)

FG_SEED = 1234
"""Base seed of the per-case foreground sampling when preprocessing a dataset (mixed with the case id)."""

OUTSIDE_MASK_LABEL = -1
"""Written into the labels where the label is background and the voxel outside the nonzero mask, when any
channel is normalized inside that mask (nnU-Net 2.8.1's ``crop_to_nonzero(nonzero_label=-1)``). Never a
class: training zeroes masked channels there after augmentation and then counts it as background
(`autoseg.data.augment.restore_masked_background`)."""


@dataclass(frozen=True)
class CaseProperties:
    """What was done to one case, enough to put a prediction back on the original grid.

    ``shape_before_crop``, ``bbox``, ``shape_after_crop`` and ``spacing_original`` are in
    the original (z, y, x) array order; ``spacing_after_resampling``,
    ``shape_after_resampling`` and ``separate_z_axis`` in the transposed order.
    """

    SCHEMA: ClassVar[str] = "autoseg.case_properties"
    VERSION: ClassVar[int] = 1

    case_id: str
    original_geometry: Geometry
    shape_before_crop: tuple[int, int, int]
    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    """Crop box, half-open [start, stop) per axis, in original array coordinates."""
    shape_after_crop: tuple[int, int, int]
    spacing_original: tuple[float, float, float]
    spacing_after_resampling: tuple[float, float, float]
    shape_after_resampling: tuple[int, int, int]
    separate_z_axis: int | None
    """Transposed axis resampled on its own (nearest) because of anisotropy; None if none was."""
    classes_present: tuple[int, ...]
    """Label values found in the case's segmentation (empty without one)."""


def outside_mask_label(normalization: Sequence[ChannelNormalization]) -> int | None:
    """`OUTSIDE_MASK_LABEL` when some channel is normalized inside the nonzero mask, else None."""
    return OUTSIDE_MASK_LABEL if any(n.use_nonzero_mask for n in normalization) else None


def _declared_labels(plan: Plan) -> list[int]:
    """Every value a label map may hold: the classes (or the values regions cover) and the ignore label."""
    ignore = plan.ignore_label
    return sorted({*plan.label_scheme.label_values, *(() if ignore is None else (ignore,))})


def _check_case(data: np.ndarray, seg: np.ndarray | None, plan: Plan, case_id: str) -> tuple[list[int], tuple[int, ...]]:
    """The plan's declared label values and the ones ``seg`` holds; a shape or an undeclared label is an error."""
    if data.ndim != 4:
        raise AutosegError(f"expected image data of shape (C, z, y, x), got {data.shape}", case_id or None)
    if seg is not None and seg.shape != data.shape[1:]:
        raise AutosegError(f"label shape {seg.shape} differs from image shape {data.shape[1:]}", case_id or None)
    labels = _declared_labels(plan)
    classes_present: tuple[int, ...] = ()
    if seg is not None:
        classes_present = tuple(int(v) for v in np.unique(seg))
        unknown = sorted(set(classes_present) - set(labels))
        if unknown:
            raise AutosegError(f"label value(s) {unknown} are not declared in dataset.json labels {labels}",
                               case_id or None)
    if max(labels) > np.iinfo(np.int8).max:
        raise AutosegError(f"at most {np.iinfo(np.int8).max + 1} labels are supported, got {max(labels) + 1}")
    return labels, classes_present


def preprocess_case(data: np.ndarray, geometry: Geometry, seg: np.ndarray | None, plan: Plan,
                    config: Configuration, rng: np.random.Generator | None = None,
                    case_id: str = "") -> tuple[np.ndarray, np.ndarray | None, CaseProperties, dict[int, np.ndarray]]:
    """Preprocess one case (training case, or a new image with ``seg=None`` at inference).

    ``data`` is float32 (C, z, y, x) and ``seg`` (z, y, x) as read by `read_case`/`read_image`.
    Returns data float32 (C, *spatial), seg int8 (1, *spatial) or None, the properties that
    `revert_preprocessing` needs, and sampled foreground coordinates per class (empty
    without a seg). ``rng`` seeds the foreground sampling (default: a fixed seed).
    """
    labels, classes_present = _check_case(data, seg, plan, case_id)
    tf = tuple(plan.transpose_forward)

    bbox, mask = crop_to_nonzero(data)
    box = tuple(slice(a, b) for a, b in bbox)
    cropped = np.array(data[(slice(None), *box)], dtype=np.float32)
    cropped_seg = None if seg is None else seg[box]

    cropped = np.ascontiguousarray(cropped.transpose(0, *[a + 1 for a in tf]))
    mask = mask.transpose(tf)
    spacing_t = tuple(float(geometry.spacing[a]) for a in tf)
    cropped = normalize(cropped, mask, plan.normalization)

    new_spacing = target_spacing(config, spacing_t)
    new_shape = resampled_shape(cropped.shape[1:], spacing_t, new_spacing)
    # the anisotropy rule's axis is recorded only when resampling actually happens
    axis = separate_axis(spacing_t, new_spacing) if new_shape != cropped.shape[1:] else None
    out = resample_data(cropped, new_shape, config.resample_order_data, axis)

    out_seg, fg = None, {}
    if cropped_seg is not None:
        seg_t = np.ascontiguousarray(cropped_seg.transpose(tf)).astype(np.int16)
        outside = outside_mask_label(plan.normalization)
        if outside is not None:
            seg_t[(seg_t == 0) & ~mask] = outside
            labels = sorted(labels + [outside])
        out_seg = resample_seg(seg_t, new_shape, labels, config.resample_order_seg, axis).astype(np.int8)[None]
        # oversampling targets annotated foreground: the ignore label is not a class
        fg = sample_foreground(out_seg[0], [c for c in labels if c not in (0, plan.ignore_label)],
                               rng if rng is not None else np.random.default_rng(FG_SEED))
    props = CaseProperties(
        case_id=case_id, original_geometry=geometry,
        shape_before_crop=tuple(int(s) for s in data.shape[1:]),  # type: ignore[arg-type]
        bbox=bbox,  # type: ignore[arg-type]
        shape_after_crop=tuple(b - a for a, b in bbox),  # type: ignore[arg-type]
        spacing_original=tuple(float(s) for s in geometry.spacing),  # type: ignore[arg-type]
        spacing_after_resampling=new_spacing,
        shape_after_resampling=tuple(int(s) for s in new_shape),  # type: ignore[arg-type]
        separate_z_axis=axis, classes_present=classes_present)
    return out, out_seg, props, fg


def revert_preprocessing(array: np.ndarray, props: CaseProperties, plan: Plan, config: Configuration,
                         order: int = 1, activation: Callable[[np.ndarray], np.ndarray] | None = None,
                         dtype: type = np.float32) -> np.ndarray:
    """Put (K, *preprocessed spatial) probabilities or logits back on the original (z, y, x) grid.

    Resamples to the cropped shape (same separate-axis rule as preprocessing, ``order``
    in-plane), applies ``activation`` (logits -> probabilities: nnU-Net resamples the logits and
    takes their softmax or sigmoid only then), pastes into the full original extent (outside
    the crop: channel 0 = 1, the others 0, i.e. background) and transposes back. The resampling
    computes in ``dtype``. ``argmax(0)``
    of the result can be written with ``write_image(path, seg, props.original_geometry)``.
    """
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(props.shape_after_resampling):
        raise ValueError(f"expected (K, *{props.shape_after_resampling}), got {array.shape}")
    tf, tb = tuple(plan.transpose_forward), tuple(plan.transpose_backward)
    crop_shape_t = tuple(props.shape_after_crop[a] for a in tf)
    resampled = resample_data(array, crop_shape_t, order, props.separate_z_axis, dtype)
    if activation is not None:
        resampled = activation(resampled)
    resampled = resampled.transpose(0, *[a + 1 for a in tb])
    full = np.zeros((array.shape[0], *props.shape_before_crop), np.float32)
    if not plan.label_scheme.has_regions:  # region outputs are all 0 outside the crop: no region there
        full[0] = 1.0
    box = tuple(slice(a, b) for a, b in props.bbox)
    full[(slice(None), *box)] = resampled
    return full
