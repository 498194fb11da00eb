"""Dataset fingerprint: the per-case and per-dataset statistics the planner needs.

Written once per dataset to ``preprocessed/<dataset>/fingerprint.json`` and reused unless
``--force``; reading every raw case is the slow part of planning, the rules are instant.
All shapes and spacings are in array order (z, y, x), before any transpose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from autoseg.common.errors import AutosegError, DatasetError
from autoseg.common.jsonio import load_record, save_record
from autoseg.common.paths import Paths
from autoseg.common.procs import spawn_pool
from autoseg.common.progress import progress
from autoseg.dataset.io import read_case, read_image
from autoseg.dataset.spec import CaseFiles, DatasetSpec, LabelValue, ignore_label, load_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntensityStats:
    """Foreground intensity statistics of one channel (from sampled foreground voxels)."""

    mean: float
    median: float
    std: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass(frozen=True)
class CaseFingerprint:
    """One training case: geometry before/after crop-to-nonzero and voxels per label.

    ``class_voxels`` counts every value found, the ignore label included (how sparse the
    annotation is); nothing downstream treats the ignore label as a class.
    """

    case_id: str
    spacing: tuple[float, float, float]
    shape_before_crop: tuple[int, int, int]
    shape_after_crop: tuple[int, int, int]
    relative_size_after_crop: float
    class_voxels: dict[int, int]


@dataclass(frozen=True)
class Fingerprint:
    """Per-dataset statistics the planner needs, and nothing it can re-read cheaply."""

    SCHEMA: ClassVar[str] = "autoseg.fingerprint"
    VERSION: ClassVar[int] = 1

    dataset: str
    channel_names: dict[int, str]
    labels: dict[str, LabelValue]
    cases: tuple[CaseFingerprint, ...]
    foreground_intensity: tuple[IntensityStats, ...]
    regions_class_order: tuple[int, ...] = ()
    """dataset.json ``regions_class_order`` (region-based training), carried on to the plan."""

    @property
    def ignore_label(self) -> int | None:
        """Value of dataset.json's ``"ignore"`` label, None when it declares none."""
        return ignore_label(self.labels)

    @property
    def spacings(self) -> np.ndarray:
        """(n_cases, 3) spacings in mm, (z, y, x)."""
        return np.array([c.spacing for c in self.cases], dtype=float)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        """(n_cases, 3) shapes after crop-to-nonzero, (z, y, x)."""
        return np.array([c.shape_after_crop for c in self.cases], dtype=int)

    @property
    def median_relative_size_after_crop(self) -> float:
        return float(np.median([c.relative_size_after_crop for c in self.cases]))


# --------------------------------------------------------------------------- extraction

FOREGROUND_SAMPLES_PER_CASE = 10_000
"""Foreground voxels sampled per case and channel for the intensity statistics (nnU-Net's
``collect_foreground_intensities`` default, ``num_samples=10000``): enough for stable
percentiles, bounded memory however large the dataset."""

PERCENTILES = (0.5, 99.5)
"""Foreground percentiles kept per channel (nnU-Net's CT clipping bounds)."""

DEFAULT_SEED = 1234
"""Seed of the foreground sampling (nnU-Net uses 1234 too); same seed, same fingerprint."""


def nonzero_bbox(image: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of the voxels where any channel is nonzero, holes filled (nnU-Net's crop).

    ``image`` is (C, z, y, x). An all-zero image keeps its full extent. Filling holes keeps
    dark structures enclosed by the body (air in the lungs, CSF) inside the mask.
    """
    from scipy.ndimage import binary_fill_holes

    mask = binary_fill_holes(np.any(image != 0, axis=0))
    if not mask.any():
        return tuple(slice(0, n) for n in image.shape[1:])  # type: ignore[return-value]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def _fingerprint_case(job: tuple[CaseFiles, int, int, int | None]) -> tuple[CaseFingerprint, list[np.ndarray]]:
    """One case's geometry, label counts and sampled foreground intensities (runs in a worker).

    Foreground is label > 0 without the ignore label: unannotated voxels may be background,
    and their intensities would bias the CT clipping and normalization statistics.
    """
    case, num_samples, seed, ignore = job

    image, geom = read_case(case.images)
    if case.label is None:
        raise DatasetError(f"case {case.case_id!r} has no label file", case.images[0])
    label, label_geom = read_image(case.label)
    if tuple(label.shape) != tuple(image.shape[1:]):
        raise DatasetError(f"label shape {tuple(label.shape)} differs from image shape "
                           f"{tuple(image.shape[1:])}", case.label)
    box = nonzero_bbox(image)
    cropped = image[(slice(None), *box)]
    cropped_label = label[box]
    values, counts = np.unique(label, return_counts=True)
    # per-case generator from (seed, case id): independent of worker scheduling and case order
    rng = np.random.default_rng([seed, *case.case_id.encode("utf-8")])
    foreground = cropped_label > 0
    if ignore is not None:
        foreground &= cropped_label != ignore
    samples = []
    for channel in cropped:
        fg = channel[foreground]
        take = min(num_samples, fg.size)
        samples.append(rng.choice(fg, size=take, replace=False).astype(np.float64) if take else
                       np.empty(0, dtype=np.float64))
    before = tuple(int(s) for s in image.shape[1:])
    after = tuple(int(s) for s in cropped.shape[1:])
    fp = CaseFingerprint(
        case_id=case.case_id,
        spacing=tuple(float(s) for s in geom.spacing),  # type: ignore[arg-type]
        shape_before_crop=before,  # type: ignore[arg-type]
        shape_after_crop=after,  # type: ignore[arg-type]
        relative_size_after_crop=float(np.prod(after) / np.prod(before)),
        class_voxels={int(v): int(c) for v, c in zip(values, counts)},
    )
    return fp, samples


def intensity_stats(samples: np.ndarray) -> IntensityStats:
    """Summary statistics of one channel's pooled foreground samples."""
    lo, hi = np.percentile(samples, PERCENTILES)
    return IntensityStats(mean=float(np.mean(samples)), median=float(np.median(samples)),
                          std=float(np.std(samples)), min=float(np.min(samples)),
                          max=float(np.max(samples)), percentile_00_5=float(lo),
                          percentile_99_5=float(hi))


def extract_fingerprint(spec: DatasetSpec, num_workers: int = 1, seed: int = DEFAULT_SEED,
                        progress_bar: bool = True) -> Fingerprint:
    """Read every training case once and collect what the planner needs.

    Per case: spacing, shape before/after crop-to-nonzero, relative size after crop, voxels
    per label value. Per channel: foreground (label > 0, the ignore label excluded)
    intensity statistics from up to `FOREGROUND_SAMPLES_PER_CASE` voxels sampled uniformly
    per case with a generator seeded from ``(seed, case id)``, so the result does not depend
    on ``num_workers``.
    """
    if num_workers < 1:
        raise AutosegError(f"number of workers must be >= 1, got {num_workers}", "-j")
    jobs = [(case, FOREGROUND_SAMPLES_PER_CASE, seed, spec.ignore_label) for case in spec.cases]
    results: list[tuple[CaseFingerprint, list[np.ndarray]]] = []
    bar = dict(total=len(jobs), desc=f"fingerprint {spec.name}", unit="case", enabled=progress_bar)
    if num_workers == 1 or len(jobs) < 2:
        results = list(progress(map(_fingerprint_case, jobs), **bar))
    else:
        chunk = max(1, len(jobs) // (num_workers * 8))
        with spawn_pool(min(num_workers, len(jobs))) as pool:
            results = list(progress(pool.map(_fingerprint_case, jobs, chunksize=chunk), **bar))
    n_channels = spec.num_channels
    stats = []
    for ch in range(n_channels):
        pooled = np.concatenate([samples[ch] for _, samples in results])
        if pooled.size == 0:
            raise DatasetError("no foreground voxels (label > 0) in any training case; "
                               "cannot compute intensity statistics", spec.root / "labelsTr")
        stats.append(intensity_stats(pooled))
    log.info("fingerprinted %d case(s) of %s", len(results), spec.name)
    return Fingerprint(dataset=spec.name, channel_names=dict(spec.channel_names), labels=dict(spec.labels), regions_class_order=spec.regions_class_order,
                       cases=tuple(fp for fp, _ in results), foreground_intensity=tuple(stats))


def load_or_extract_fingerprint(paths: Paths, dataset: str, num_workers: int = 1, force: bool = False,
                                spec: DatasetSpec | None = None, progress_bar: bool = True) -> Fingerprint:
    """The saved ``preprocessed/<dataset>/fingerprint.json``, or a fresh one (saved) if absent or ``force``.

    Reading the raw cases is the slow part of planning, so the fingerprint is cached. A saved
    fingerprint whose case ids no longer match the raw dataset (``spec``, when given) is stale
    and is extracted again.
    """
    file = paths.fingerprint_file(dataset)
    if file.exists() and not force:
        fp = load_record(file, Fingerprint)
        if spec is None or sorted(c.case_id for c in fp.cases) == sorted(c.case_id for c in spec.cases):
            log.info("reusing %s (use --force to extract it again)", file)
            return fp
        log.warning("%s lists other cases than %s; extracting it again", file, spec.root)
    if spec is None:
        spec = load_dataset(paths.raw_dataset(dataset))
    fp = extract_fingerprint(spec, num_workers=num_workers, progress_bar=progress_bar)
    save_record(file, fp)
    return fp
