"""Planning fixtures: hand-built fingerprints (fast rule tests) and the real 260-case Hippocampus one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from autoseg.common.paths import Paths
from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats, load_or_extract_fingerprint
from tests.helpers import HIPPOCAMPUS_MISSING, hippocampus_available, hippocampus_case_ids, link_hippocampus_subset

HIPPOCAMPUS_STATS = IntensityStats(mean=21759.77, median=365.16, std=59905.95, min=0.0, max=486420.22,
                                   percentile_00_5=28.0, percentile_99_5=276798.13)
"""Foreground MRI statistics of the 260 MSD Hippocampus cases (as our fingerprint measures them)."""

CT_STATS = IntensityStats(mean=80.0, median=75.0, std=60.0, min=-1024.0, max=3071.0,
                          percentile_00_5=-80.0, percentile_99_5=310.0)


def make_fingerprint(shapes: list[tuple[int, int, int]], spacings: list[tuple[float, float, float]],
                     channel_names: dict[int, str] | None = None, relative_size: float = 1.0,
                     labels: dict[str, int] | None = None, name: str = "Dataset100_Test") -> Fingerprint:
    """A Fingerprint from per-case shapes after crop and spacings (no image is read)."""
    channel_names = channel_names or {0: "MRI"}
    labels = labels or {"background": 0, "Anterior": 1, "Posterior": 2}
    cases = tuple(CaseFingerprint(case_id=f"case_{i:03d}", spacing=sp, shape_before_crop=sh, shape_after_crop=sh,
                                  relative_size_after_crop=relative_size, class_voxels={0: int(np.prod(sh))})
                  for i, (sh, sp) in enumerate(zip(shapes, spacings)))
    stats = tuple(CT_STATS if n.lower() == "ct" else HIPPOCAMPUS_STATS for n in channel_names.values())
    return Fingerprint(dataset=name, channel_names=channel_names, labels=labels, cases=cases,
                       foreground_intensity=stats)


@pytest.fixture(scope="session")
def hippocampus_like_fingerprint() -> Fingerprint:
    """260 cases at 1 mm isotropic with the Hippocampus median cropped shape (36, 50, 35), shapes spread around it."""
    rng = np.random.default_rng(0)
    centre = np.array((36, 50, 35))
    offsets = rng.integers(-5, 6, size=(129, 3))
    # mirrored offsets plus two centre cases: the median is exactly the centre
    shapes = [tuple(int(v) for v in s) for s in (centre, centre, *(centre + offsets), *(centre - offsets))]
    return make_fingerprint(shapes, [(1.0, 1.0, 1.0)] * len(shapes), name="Dataset004_Hippocampus")


@pytest.fixture(scope="session")
def anisotropic_ct_fingerprint() -> Fingerprint:
    """20 CT cases, 5 x 0.7 x 0.7 mm, 25 x 192 x 192 voxels (thick-slice CT)."""
    return make_fingerprint([(25, 192, 192)] * 20, [(5.0, 0.7, 0.7)] * 20, channel_names={0: "CT"},
                            labels={"background": 0, "organ": 1}, name="Dataset101_ThickCT")


@pytest.fixture(scope="session")
def hippocampus_full(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """All 260 real Hippocampus cases linked in nnU-Net layout, fingerprinted once with 2 workers."""
    if not hippocampus_available():
        pytest.skip(HIPPOCAMPUS_MISSING)
    paths = Paths.under(tmp_path_factory.mktemp("hippo_full"))
    link_hippocampus_subset(paths.raw, hippocampus_case_ids())
    load_or_extract_fingerprint(paths, "Dataset004_Hippocampus", num_workers=2, progress_bar=False)
    return paths


@pytest.fixture
def hippocampus_full_copy(hippocampus_full: Paths, tmp_path: Path) -> Paths:
    """The full Hippocampus raw data with a private preprocessed root holding only the fingerprint."""
    paths = Paths(raw=hippocampus_full.raw, preprocessed=tmp_path / "preprocessed", results=tmp_path / "results")
    src = hippocampus_full.fingerprint_file("Dataset004_Hippocampus")
    dst = paths.fingerprint_file("Dataset004_Hippocampus")
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    return paths
