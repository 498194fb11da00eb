"""Dataset fingerprint: the per-case and per-dataset statistics the planner needs.

Written once per dataset to ``preprocessed/<dataset>/fingerprint.json`` and reused unless
``--force``; reading every raw case is the slow part of planning, the rules are instant.
All shapes and spacings are in array order (z, y, x), before any transpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


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
    """One training case: geometry before/after crop-to-nonzero and voxels per label."""

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
    labels: dict[str, int]
    cases: tuple[CaseFingerprint, ...]
    foreground_intensity: tuple[IntensityStats, ...]

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
