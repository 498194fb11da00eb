"""What every benchmark records next to its figures (imported by the bench_*.py scripts)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Short hash of the checked-out commit, so a figure in RESULTS.md names the code it measured."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


HIPPOCAMPUS = "Dataset004_Hippocampus"


def prepare_hippocampus(workdir: Path, cases: int, configs: tuple[str, ...], workers: int = 2):
    """Plan and preprocess real MSD Hippocampus under ``workdir`` (kept: a rerun reuses it).

    ``cases`` = 0 takes all 260 training cases, so the plan is the full dataset's (3d_fullres patch
    40x56x40, batch 9 for 8 GB, as nnU-Net). Returns (Paths, Plan).
    """
    import sys

    sys.path.insert(0, str(REPO))
    from autoseg.common.paths import Paths
    from autoseg.planning.planner import PlanRequest, plan_and_save
    from autoseg.planning.store import load_plan
    from autoseg.preprocess import preprocess_dataset
    from tests.helpers import hippocampus_available, hippocampus_case_ids, link_hippocampus_subset

    if not hippocampus_available():
        raise SystemExit("real Hippocampus data not found (../shared/datasets/msd_hippocampus or "
                         "$AUTOSEG_TEST_HIPPOCAMPUS)")
    paths = Paths.under(Path(workdir))
    if not paths.plans_file(HIPPOCAMPUS).is_file():
        link_hippocampus_subset(paths.raw, hippocampus_case_ids(cases or None))
        plan_and_save(paths, HIPPOCAMPUS, PlanRequest(num_workers=workers, progress_bar=False))
    plan = load_plan(paths, HIPPOCAMPUS)
    preprocess_dataset(paths, HIPPOCAMPUS, list(configs), num_workers=workers, plan=plan)
    return paths, plan
