"""Preprocessing: raw case -> transposed, cropped, normalized, resampled arrays (and back).

The steps and their order are nnU-Net's (``DefaultPreprocessor``), so a plan gives the same
arrays a nnU-Net user expects:

1. transpose the axes by ``plan.transpose_forward`` (the coarse axis first);
2. crop to the bounding box of the nonzero region (any channel != 0, holes filled);
3. normalize each channel by ``plan.normalization`` (z-score inside the nonzero mask when
   ``use_nonzero_mask``, so the zero background outside it stays 0); when a channel is
   normalized inside the mask, background labels outside it become -1 (`OUTSIDE_MASK_LABEL`),
   so that training can put those voxels back to 0 after intensity augmentation;
4. resample to the configuration's target spacing: images with cubic splines, labels by
   linear interpolation of each class's one-hot mask followed by argmax (a voxel can only
   take a label that was there). When the spacing is anisotropic (max/min > 3, nnU-Net's
   rule) the coarse axis is resampled separately, with nearest neighbour, after an in-plane
   resampling of each slice, so that thick slices are not smeared into each other.
   The ignore label (sparse annotation) is resampled like any other label, so unannotated
   voxels stay unannotated and no annotation is invented.

Cropping commutes with transposing, so the crop box is found and stored in the original
(z, y, x) array coordinates; everything after cropping is in the transposed order.
`revert_preprocessing` undoes steps 4, 2 and 1 for predictions. Files per case (CASE.json
last, so a case is complete exactly when its json exists):

    <data_identifier>/CASE.npy      float32 (C, *spatial)
    <data_identifier>/CASE_seg.npy  int8 (1, *spatial); -1 outside the nonzero mask (masked normalization)
    <data_identifier>/CASE_fg.npz   class_<k> -> (N, 3) int32 sampled voxel coordinates
    <data_identifier>/CASE.json     CaseProperties

A run holds an exclusive lock on the data folder (``.lock``), so two runs never write the same
cases, and every temp file of a case write found under the lock was left by a killed run.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
from scipy.ndimage import binary_fill_holes
from skimage.transform import resize

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_with, load_record, save_record
from autoseg.common.locks import PidLock
from autoseg.common.paths import Paths
from autoseg.common.procs import spawn_pool
from autoseg.common.progress import progress
from autoseg.dataset.io import Geometry, read_case, read_image
from autoseg.dataset.spec import CaseFiles, LabelValue, load_dataset
from autoseg.planning.plans import ChannelNormalization, Configuration, Plan
from autoseg.splits import ensure_splits

log = logging.getLogger(__name__)

ANISOTROPY_RATIO = 3.0
"""Resample the coarse axis separately when max/min spacing exceeds this (nnU-Net's ANISO_THRESHOLD)."""

FG_SAMPLES_PER_CLASS = 10_000
"""Foreground voxels stored per class for oversampling (nnU-Net's num_samples, per class)."""

FG_MIN_COVERAGE = 0.01
"""...but at least this fraction of a class's voxels, so large classes stay well covered (nnU-Net)."""

NORM_EPS = 1e-8
"""Floor of a standard deviation or intensity range we divide by (nnU-Net's)."""

FG_SEED = 1234
"""Base seed of the per-case foreground sampling when preprocessing a dataset (mixed with the case id)."""

OUTSIDE_MASK_LABEL = -1
"""Written into the labels where the label is background and the voxel outside the nonzero mask, when any
channel is normalized inside that mask (nnU-Net 2.8.1's ``crop_to_nonzero(nonzero_label=-1)``). Never a
class: training zeroes masked channels there after augmentation and then counts it as background
(`autoseg.data.augment.restore_masked_background`)."""

SETTINGS_FILENAME = "preprocessing.json"
"""Record, in each data folder, of the settings the cases there were made with."""

LOCK_FILE = ".lock"
"""Held (``flock``) in a data folder while a run preprocesses into it."""

STALE_TEMP_RE = re.compile(r"^\..+\.(npy|npz|json)\.[A-Za-z0-9_]+\.tmp$")
"""Temp files of the folder's atomic writes (``atomic_write_with``: ``.<name>.<random>.tmp``)."""


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


def migrate_v1_to_v2(body: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (before 2026-12-05) never marked outside the nonzero mask in the labels."""
    return {**body, "outside_mask_label": None}


@dataclass(frozen=True)
class PreprocessingSettings:
    """The plan settings that determine a data folder's content (spacing, normalization, ...).

    Stored as ``<data_identifier>/preprocessing.json``: rerunning with a plan that would
    produce different arrays into the same folder is refused unless forced, instead of
    silently mixing cases made two ways.
    """

    SCHEMA: ClassVar[str] = "autoseg.preprocessing_settings"
    VERSION: ClassVar[int] = 2
    MIGRATIONS: ClassVar[dict[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {1: migrate_v1_to_v2}

    dataset: str
    data_identifier: str
    ndim: int
    spacing: tuple[float, ...]
    transpose_forward: tuple[int, int, int]
    normalization: tuple[ChannelNormalization, ...]
    labels: dict[str, LabelValue]
    resample_order_data: int
    resample_order_seg: int
    outside_mask_label: int | None
    """`OUTSIDE_MASK_LABEL` when the labels carry it outside the nonzero mask, None when they never do."""


@dataclass
class PreprocessedCase:
    """One preprocessed case as training reads it (arrays memory-mapped by default)."""

    data: np.ndarray
    seg: np.ndarray
    properties: CaseProperties
    fg_locations: dict[int, np.ndarray]


# ----------------------------------------------------------------------------- pure steps


def crop_to_nonzero(data: np.ndarray) -> tuple[tuple[tuple[int, int], ...], np.ndarray]:
    """Bounding box of voxels where any channel is nonzero, and the hole-filled mask inside it.

    An all-zero image keeps its full extent. Returns (bbox, mask cropped to bbox).
    """
    mask = np.any(data != 0, axis=0)
    if not mask.any():
        return tuple((0, int(s)) for s in mask.shape), np.ones(mask.shape, bool)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bbox.append((int(hits[0]), int(hits[-1]) + 1))
    box = tuple(slice(a, b) for a, b in bbox)
    return tuple(bbox), binary_fill_holes(mask[box])


def normalize(data: np.ndarray, mask: np.ndarray, schemes: Sequence[ChannelNormalization]) -> np.ndarray:
    """Normalize each channel of float32 (C, ...) data in place by its scheme (see ChannelNormalization)."""
    if len(schemes) != data.shape[0]:
        raise AutosegError(f"the plan normalizes {len(schemes)} channel(s) but the image has {data.shape[0]}")
    for c, norm in enumerate(schemes):
        x = data[c]
        if norm.scheme == "zscore":
            region = mask if norm.use_nonzero_mask and mask.any() else np.ones(x.shape, bool)
            values = x[region]
            x[region] = (values - values.mean()) / max(float(values.std()), NORM_EPS)
        elif norm.scheme == "ct":
            if None in (norm.clip_low, norm.clip_high, norm.mean, norm.std):
                raise AutosegError(f"channel {c}: 'ct' normalization needs clip_low, clip_high, mean and std",
                                   "plans.json:normalization")
            np.clip(x, norm.clip_low, norm.clip_high, out=x)
            x -= norm.mean
            x /= max(float(norm.std), NORM_EPS)
        elif norm.scheme == "rescale_to_0_1":
            lo, hi = float(x.min()), float(x.max())
            x -= lo
            x /= max(hi - lo, NORM_EPS)
        elif norm.scheme == "rgb_to_0_1":
            x /= 255.0
        elif norm.scheme != "none":
            raise AutosegError(f"channel {c}: unknown normalization scheme {norm.scheme!r}",
                               "plans.json:normalization")
    return data


def separate_axis(current_spacing: Sequence[float], new_spacing: Sequence[float]) -> int | None:
    """The axis to resample on its own, or None (nnU-Net's rule).

    The current spacing is checked first, then the new one: if max/min > ANISOTROPY_RATIO,
    the one axis with the largest spacing is the separate one. Two axes sharing the largest
    spacing (e.g. (1, 3, 3)) mean no single coarse axis, hence no separate resampling.
    """
    for spacing in (np.asarray(current_spacing, float), np.asarray(new_spacing, float)):
        if spacing.max() / spacing.min() > ANISOTROPY_RATIO:
            coarse = np.flatnonzero(spacing == spacing.max())
            return int(coarse[0]) if len(coarse) == 1 else None
    return None


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Shape covering the same extent at ``new_spacing`` (rounded, at least 1 voxel)."""
    return tuple(max(1, int(round(s * sp / nsp))) for s, sp, nsp in zip(shape, spacing, new_spacing))


def _resize_nearest_along(array: np.ndarray, axis: int, new_len: int) -> np.ndarray:
    """Nearest-neighbour resize of one axis, sampling at voxel centres (like map_coordinates order 0)."""
    old_len = array.shape[axis]
    if old_len == new_len:
        return array
    pos = (np.arange(new_len) + 0.5) * (old_len / new_len) - 0.5
    idx = np.clip(np.floor(pos + 0.5).astype(int), 0, old_len - 1)
    return np.take(array, idx, axis=axis)


def _resize(volume: np.ndarray, new_shape: tuple[int, ...], order: int, axis: int | None) -> np.ndarray:
    """Resize a 3D float volume; with ``axis``, in-plane at ``order`` then that axis by nearest."""
    if volume.shape == tuple(new_shape):
        return volume
    if axis is None:
        return resize(volume, new_shape, order=order, mode="edge", anti_aliasing=False).astype(np.float32)
    in_plane = list(new_shape)
    in_plane[axis] = volume.shape[axis]
    out = volume
    if tuple(in_plane) != volume.shape:
        # a spline with zoom 1 along `axis` equals resizing every slice on its own (one call,
        # not a Python loop); each slice is then clipped to its own input range, as a
        # per-slice resize would do
        out = resize(volume, tuple(in_plane), order=order, mode="edge", anti_aliasing=False,
                     clip=False).astype(np.float32)
        other = tuple(a for a in range(volume.ndim) if a != axis)
        lo = np.expand_dims(volume.min(axis=other), other)
        hi = np.expand_dims(volume.max(axis=other), other)
        out = np.clip(out, lo, hi)
    # nearest along the coarse axis, like nnU-Net's order_z = 0: thick slices are not blended
    return _resize_nearest_along(out, axis, new_shape[axis])


def resample_data(data: np.ndarray, new_shape: tuple[int, ...], order: int, axis: int | None) -> np.ndarray:
    """Resample float (C, *spatial) data channel by channel; returns float32."""
    return np.stack([_resize(data[c].astype(np.float32, copy=False), new_shape, order, axis)
                     for c in range(data.shape[0])]).astype(np.float32, copy=False)


def resample_seg(seg: np.ndarray, new_shape: tuple[int, ...], labels: Sequence[int], order: int,
                 axis: int | None) -> np.ndarray:
    """Resample a (z, y, x) label map via each label's interpolated one-hot mask, then argmax.

    Only values in ``labels`` can appear in the output, so resampling never invents a label
    (a plain spline on label values would create e.g. 1s between 0 and 2). Labels absent
    from ``seg`` are skipped: their mask interpolates to 0 everywhere and can never win.
    Pass the ignore label among ``labels``: it then competes like a class, so unannotated
    regions keep their extent instead of turning into background or a class.
    """
    if seg.shape == tuple(new_shape):
        return seg.copy()
    best = np.full(new_shape, -1.0, np.float32)
    out = np.zeros(new_shape, seg.dtype)
    present = set(np.unique(seg).tolist())
    for label in (lab for lab in labels if lab in present):
        score = _resize((seg == label).astype(np.float32), new_shape, order, axis)
        better = score > best
        out[better] = label
        best[better] = score[better]
    return out


def sample_foreground(seg: np.ndarray, classes: Sequence[int], rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Up to FG_SAMPLES_PER_CLASS voxel coordinates per class (at least FG_MIN_COVERAGE of them).

    Training oversamples foreground patches from these, instead of scanning the volume.
    Returns class -> (N, 3) int32 array (N == 0 for a class absent from this case).
    """
    out: dict[int, np.ndarray] = {}
    for c in classes:
        locs = np.argwhere(seg == c)
        if len(locs) == 0:
            out[c] = np.zeros((0, seg.ndim), np.int32)
            continue
        n = max(min(FG_SAMPLES_PER_CLASS, len(locs)), int(np.ceil(len(locs) * FG_MIN_COVERAGE)))
        pick = np.sort(rng.choice(len(locs), n, replace=False))
        out[c] = locs[pick].astype(np.int32)
    return out


def target_spacing(config: Configuration, transposed_spacing: Sequence[float]) -> tuple[float, float, float]:
    """The spacing a case is resampled to: the config's, or for 2D (own axis-0 spacing, *in-plane)."""
    if config.ndim == 2:
        return (float(transposed_spacing[0]), *map(float, config.spacing))  # type: ignore[return-value]
    if len(config.spacing) != 3:
        raise AutosegError(f"configuration {config.name!r} has {len(config.spacing)} spacing entries, expected 3",
                           f"plans.json:{config.name}.spacing")
    return tuple(map(float, config.spacing))  # type: ignore[return-value]


def _declared_labels(plan: Plan) -> list[int]:
    """Every value a label map may hold: the classes (or the values regions cover) and the ignore label."""
    ignore = plan.ignore_label
    return sorted({*plan.label_scheme.label_values, *(() if ignore is None else (ignore,))})


def preprocess_case(data: np.ndarray, geometry: Geometry, seg: np.ndarray | None, plan: Plan,
                    config: Configuration, rng: np.random.Generator | None = None,
                    case_id: str = "") -> tuple[np.ndarray, np.ndarray | None, CaseProperties, dict[int, np.ndarray]]:
    """Preprocess one case (training case, or a new image with ``seg=None`` at inference).

    ``data`` is float32 (C, z, y, x) and ``seg`` (z, y, x) as read by `read_case`/`read_image`.
    Returns data float32 (C, *spatial), seg int8 (1, *spatial) or None, the properties that
    `revert_preprocessing` needs, and sampled foreground coordinates per class (empty
    without a seg). ``rng`` seeds the foreground sampling (default: a fixed seed).
    """
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
                         order: int = 1) -> np.ndarray:
    """Put (K, *preprocessed spatial) probabilities or logits back on the original (z, y, x) grid.

    Resamples to the cropped shape (same separate-axis rule as preprocessing, ``order``
    in-plane), pastes into the full original extent (outside the crop: channel 0 = 1, the
    others 0, i.e. background) and transposes back. ``argmax(0)`` of the result can be
    written with ``write_image(path, seg, props.original_geometry)``.
    """
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(props.shape_after_resampling):
        raise ValueError(f"expected (K, *{props.shape_after_resampling}), got {array.shape}")
    tf, tb = tuple(plan.transpose_forward), tuple(plan.transpose_backward)
    crop_shape_t = tuple(props.shape_after_crop[a] for a in tf)
    resampled = resample_data(array, crop_shape_t, order, props.separate_z_axis)
    resampled = resampled.transpose(0, *[a + 1 for a in tb])
    full = np.zeros((array.shape[0], *props.shape_before_crop), np.float32)
    if not plan.label_scheme.has_regions:  # region outputs are all 0 outside the crop: no region there
        full[0] = 1.0
    box = tuple(slice(a, b) for a, b in props.bbox)
    full[(slice(None), *box)] = resampled
    return full


# ----------------------------------------------------------------------------- files


def case_files(folder: Path, case_id: str) -> dict[str, Path]:
    """The four files of a preprocessed case (``data``, ``seg``, ``fg``, ``json``)."""
    return {"data": folder / f"{case_id}.npy", "seg": folder / f"{case_id}_seg.npy",
            "fg": folder / f"{case_id}_fg.npz", "json": folder / f"{case_id}.json"}


def save_preprocessed_case(folder: Path, data: np.ndarray, seg: np.ndarray, props: CaseProperties,
                           fg: dict[int, np.ndarray]) -> None:
    """Write a case's files atomically, its json last (a case is complete once its json exists)."""
    files = case_files(folder, props.case_id)
    files["json"].unlink(missing_ok=True)  # from here on the case reads as not done
    atomic_write_with(files["data"], lambda f: np.save(f, data))
    atomic_write_with(files["seg"], lambda f: np.save(f, seg))
    atomic_write_with(files["fg"], lambda f: np.savez_compressed(f, **{f"class_{k}": v for k, v in fg.items()}))
    save_record(files["json"], props)


def list_preprocessed_cases(folder: Path) -> list[str]:
    """Ids of the complete cases in a data folder (json and arrays present), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for f in folder.glob("*.json"):
        if f.name == SETTINGS_FILENAME or f.name.startswith("."):
            continue
        files = case_files(folder, f.stem)
        if all(p.exists() for p in files.values()):
            out.append(f.stem)
    return sorted(out)


def load_preprocessed_case(folder: Path, case_id: str, mmap: bool = True) -> PreprocessedCase:
    """Read one complete case; arrays are read-only memory maps unless ``mmap=False``."""
    files = case_files(Path(folder), case_id)
    if not files["json"].exists():
        raise AutosegError(f"case {case_id!r} is not preprocessed (no {files['json'].name}); "
                           "run `autoseg preprocess`", folder)
    props = load_record(files["json"], CaseProperties)
    mode = "r" if mmap else None
    data = np.load(files["data"], mmap_mode=mode)
    seg = np.load(files["seg"], mmap_mode=mode)
    with np.load(files["fg"]) as z:
        fg = {int(k.split("_", 1)[1]): z[k] for k in z.files}
    return PreprocessedCase(data=data, seg=seg, properties=props, fg_locations=fg)


# ----------------------------------------------------------------------------- dataset


def outside_mask_label(normalization: Sequence[ChannelNormalization]) -> int | None:
    """`OUTSIDE_MASK_LABEL` when some channel is normalized inside the nonzero mask, else None."""
    return OUTSIDE_MASK_LABEL if any(n.use_nonzero_mask for n in normalization) else None


def settings_for(plan: Plan, config: Configuration) -> PreprocessingSettings:
    """The preprocessing-relevant part of a plan for one configuration."""
    return PreprocessingSettings(
        dataset=plan.dataset, data_identifier=config.data_identifier, ndim=config.ndim,
        spacing=tuple(float(s) for s in config.spacing), transpose_forward=tuple(plan.transpose_forward),
        normalization=tuple(plan.normalization), labels=dict(plan.labels),
        resample_order_data=config.resample_order_data, resample_order_seg=config.resample_order_seg,
        outside_mask_label=outside_mask_label(plan.normalization))


def _case_seed(case_id: str) -> np.random.Generator:
    """Foreground sampling seed from the case id: same files whichever worker runs the case."""
    return np.random.default_rng([FG_SEED, zlib.crc32(case_id.encode())])


def _preprocess_to_folder(case: CaseFiles, plan: Plan, config: Configuration, folder: Path) -> str:
    """Read, preprocess and write one raw training case (runs in a worker process)."""
    if case.label is None:
        raise AutosegError("training case has no label file", case.images[0])
    data, geometry = read_case(case.images)
    seg, seg_geometry = read_image(case.label)
    diffs = geometry.differences(seg_geometry)
    if diffs:
        raise AutosegError(f"label geometry differs from the image: {'; '.join(diffs)}", case.label)
    out, out_seg, props, fg = preprocess_case(data, geometry, seg, plan, config, _case_seed(case.case_id),
                                              case_id=case.case_id)
    save_preprocessed_case(folder, out, out_seg, props, fg)  # type: ignore[arg-type]
    return case.case_id


def load_dataset_plan(paths: Paths, dataset: str, plan_file: Path | None = None) -> Plan:
    """The dataset's plans.json (or ``plan_file``), with a clear message when planning never ran."""
    path = Path(plan_file) if plan_file is not None else paths.plans_file(dataset)
    if not path.exists():
        hint = "" if plan_file is not None else f"; run `autoseg plan {dataset}` first"
        raise AutosegError(f"plan file not found{hint}", path)
    return load_record(path, Plan)


def _check_settings(folder: Path, settings: PreprocessingSettings, force: bool) -> None:
    path = folder / SETTINGS_FILENAME
    if path.exists() and not force:
        old = load_record(path, PreprocessingSettings)
        if old.outside_mask_label != settings.outside_mask_label:
            raise AutosegError(
                f"this folder's labels {'do not mark' if old.outside_mask_label is None else 'mark'} the outside "
                f"of the nonzero mask with {OUTSIDE_MASK_LABEL}, the plan's normalization needs them "
                f"{'marked' if settings.outside_mask_label is not None else 'unmarked'} (made by an older "
                "autoseg or another plan); rerun with --force to redo it", path)
        if old != settings:
            raise AutosegError("this folder was preprocessed with different settings (spacing, normalization, "
                               "labels or transpose); rerun with --force to redo it, or give the plan's "
                               "configuration another data_identifier", path)
        return
    save_record(path, settings)


def preprocess_dataset(paths: Paths, dataset: str, config_names: list[str], num_workers: int = 1,
                       force: bool = False, plan: Plan | None = None) -> dict[str, Path]:
    """Make sure splits exist, then preprocess every training case for each configuration.

    Configurations sharing a ``data_identifier`` are done once. Complete cases are skipped
    (a case without its json is redone) unless ``force``. Returns config name -> data folder.
    """
    plan = plan if plan is not None else load_dataset_plan(paths, dataset)
    if plan.dataset != dataset:
        raise AutosegError(f"the plan is for {plan.dataset}, not {dataset}", "plans.json:dataset")
    if num_workers < 1:
        raise AutosegError(f"number of workers must be at least 1, got {num_workers}", "-j")
    unknown = [n for n in config_names if n not in plan.configurations]
    if unknown:
        raise AutosegError(f"configuration(s) {', '.join(unknown)} not in the plan of {dataset} "
                           f"(planned: {', '.join(plan.configurations)})", "configs")
    configs = [plan.configurations[n] for n in (config_names or list(plan.configurations))]
    spec = load_dataset(paths.raw_dataset(dataset))
    if plan.num_channels != spec.num_channels:
        raise AutosegError(f"the plan has {plan.num_channels} channel(s), the dataset {spec.num_channels}",
                           spec.dataset_json)
    # splits first: a bad user splits file fails now, not after an hour of preprocessing
    ensure_splits(paths, dataset, [c.case_id for c in spec.cases])
    by_identifier: dict[str, Configuration] = {}
    for config in configs:
        first = by_identifier.setdefault(config.data_identifier, config)
        if settings_for(plan, first) != settings_for(plan, config):
            raise AutosegError(f"configurations {first.name!r} and {config.name!r} share data_identifier "
                               f"{config.data_identifier!r} but preprocess differently", "plans.json")
    pool = spawn_pool(num_workers) if num_workers > 1 else None  # workers die with us, even SIGKILLed
    try:
        for identifier, config in by_identifier.items():
            folder = paths.preprocessed_data(dataset, identifier)
            folder.mkdir(parents=True, exist_ok=True)
            with _folder_lock(folder):
                _remove_stale_temp_files(folder)
                _check_settings(folder, settings_for(plan, config), force)
                done = set() if force else set(list_preprocessed_cases(folder))
                todo = [c for c in spec.cases if c.case_id not in done]
                log.info("%s/%s: %d case(s) to preprocess, %d already done", dataset, identifier,
                         len(todo), len(spec.cases) - len(todo))
                desc = f"preprocess {identifier}"
                if pool is None:
                    for case in progress(todo, total=len(todo), desc=desc, unit="case"):
                        _preprocess_to_folder(case, plan, config, folder)
                else:
                    futures = [pool.submit(_preprocess_to_folder, c, plan, config, folder) for c in todo]
                    for fut in progress(as_completed(futures), total=len(futures), desc=desc, unit="case"):
                        fut.result()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return {c.name: paths.preprocessed_data(dataset, c.data_identifier) for c in configs}


def _folder_lock(folder: Path) -> PidLock:
    """An exclusive `PidLock` on ``<folder>/.lock`` (our pid inside) while preprocessing into it.

    The kernel drops the lock when its holder dies, even by SIGKILL, so a killed run leaves no
    stale lock; a live holder makes us refuse with its pid. The pool's workers are spawned
    (exec), so they do not inherit the descriptor (Python opens it non-inheritable).
    """
    return PidLock(folder / LOCK_FILE, "another process ({holder}) is preprocessing into this folder")


def _remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of writes a killed run left (up to a whole case array each); call under the lock."""
    for f in folder.iterdir():
        if STALE_TEMP_RE.match(f.name) and f.is_file():
            f.unlink(missing_ok=True)
            log.info("removed %s, left by a killed preprocessing run", f)


def median_preprocessed_shape(folder: Path) -> tuple[int, ...] | None:
    """Median (transposed) shape of the complete cases in a data folder; None when it has none."""
    shapes = [load_record(case_files(folder, c)["json"], CaseProperties).shape_after_resampling
              for c in list_preprocessed_cases(folder)]
    if not shapes:
        return None
    return tuple(int(v) for v in np.median(np.array(shapes), axis=0))
