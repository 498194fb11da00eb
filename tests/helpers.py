"""Test data builders shared by the test modules (tiny synthetic datasets, real Hippocampus subsets)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autoseg.common.paths import Paths

HIPPOCAMPUS_ENV = "AUTOSEG_TEST_HIPPOCAMPUS"
"""Environment variable naming the MSD Task04 folder when it is not at ../shared/datasets."""

HIPPOCAMPUS_MSD = Path(os.environ.get(HIPPOCAMPUS_ENV) or
                       Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "msd_hippocampus")
"""The real MSD Task04 cases, read in place (never copied into the repo)."""

HIPPOCAMPUS_MISSING = (f"real MSD Hippocampus not found at {HIPPOCAMPUS_MSD} "
                       f"(set {HIPPOCAMPUS_ENV}=/path/to/msd_hippocampus)")
"""The skip reason of every real-data test, and the line the test session prints at its end."""


def hippocampus_available() -> bool:
    return (HIPPOCAMPUS_MSD / "imagesTr").is_dir()


def hippocampus_case_ids(n: int | None = None) -> list[str]:
    """Sorted MSD case ids (e.g. ``hippocampus_001``); the first ``n`` when given."""
    ids = sorted(p.name[: -len(".nii.gz")] for p in (HIPPOCAMPUS_MSD / "imagesTr").glob("*.nii.gz"))
    return ids if n is None else ids[:n]


def link_hippocampus_subset(raw_root: Path, case_ids: list[str],
                            name: str = "Dataset004_Hippocampus") -> Path:
    """An nnU-Net v2 raw dataset of the given real cases, made of symlinks into ../shared.

    The MSD files are single-channel 3D NIfTI, so the nnU-Net layout is just a rename
    (``CASE.nii.gz`` -> ``CASE_0000.nii.gz``); symlinks keep the data in shared/.
    """
    out = Path(raw_root) / name
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    for cid in case_ids:
        img = out / "imagesTr" / f"{cid}_0000.nii.gz"
        lab = out / "labelsTr" / f"{cid}.nii.gz"
        if not img.exists():
            os.symlink(HIPPOCAMPUS_MSD / "imagesTr" / f"{cid}.nii.gz", img)
        if not lab.exists():
            os.symlink(HIPPOCAMPUS_MSD / "labelsTr" / f"{cid}.nii.gz", lab)
    meta = {"name": "Hippocampus", "channel_names": {"0": "MRI"},
            "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
            "numTraining": len(case_ids), "file_ending": ".nii.gz"}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out


def run_cli_ok(paths: Paths, *args: str) -> str:
    """``autoseg --raw .. --preprocessed .. --results .. ARGS`` in-process; asserts exit 0, returns the output."""
    from click.testing import CliRunner

    from autoseg.cli import cli

    roots = ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]
    result = CliRunner().invoke(cli, [*roots, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def train_tiny_phantom(root: Path, device: str, sets: list[str]) -> list[dict]:
    """Generate a 4-case phantom, plan, preprocess and train fold 0 of 3d_fullres through the CLI on
    ``device`` with ``--set`` ``sets``; returns the training_log.jsonl records."""
    from autoseg.common.paths import Paths
    from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset

    paths = Paths.under(root)
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=4, num_test=0, shape=(8, 24, 24), shape_jitter=0))
    for step in ("plan", "preprocess"):
        run_cli_ok(paths, step, "999", "--configs", "3d_fullres")
    run_cli_ok(paths, "train", "999", "3d_fullres", "0", "--quiet", "--device", device,
               *[a for kv in sets for a in ("--set", kv)])
    log = next(paths.results.rglob("training_log.jsonl"))
    return [json.loads(s) for s in log.read_text(encoding="utf-8").splitlines()]
