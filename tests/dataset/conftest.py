"""Tiny synthetic raw datasets for the dataset-layer tests (3 cases of 8x16x16, written with write_image)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.common.paths import Paths
from autoseg.dataset.io import Geometry, write_image

TINY_SHAPE = (8, 16, 16)
TINY_NAME = "Dataset010_Tiny"
TINY_GEOMETRY = Geometry(shape=TINY_SHAPE, spacing=(2.0, 0.5, 0.5), origin=(1.0, -2.0, 3.0),
                         direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def tiny_label(seed: int) -> np.ndarray:
    """A label with background, a class-1 box and a class-2 box."""
    lab = np.zeros(TINY_SHAPE, np.uint8)
    lab[2:6, 3:9, 3:9] = 1
    lab[3:5, 10 + seed % 3:14, 10:14] = 2
    return lab


def make_tiny_dataset(raw_root: Path, num_cases: int = 3, num_channels: int = 1,
                      name: str = TINY_NAME, ending: str = ".nii.gz") -> Path:
    """A valid nnU-Net v2 raw dataset: ``num_cases`` cases with ``num_channels`` float32 channels."""
    root = Path(raw_root) / name
    rng = np.random.default_rng(0)
    for i in range(num_cases):
        case = f"case_{i:03d}"
        for c in range(num_channels):
            img = rng.normal(100.0, 10.0, TINY_SHAPE).astype(np.float32)
            write_image(root / "imagesTr" / f"{case}_{c:04d}{ending}", img, TINY_GEOMETRY)
        write_image(root / "labelsTr" / f"{case}{ending}", tiny_label(i), TINY_GEOMETRY)
    meta = {"name": name.split("_", 1)[1],
            "channel_names": {str(c): ("CT" if c == 0 else f"MR{c}") for c in range(num_channels)},
            "labels": {"background": 0, "liver": 1, "tumour": 2},
            "numTraining": num_cases, "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def edit_dataset_json(root: Path, **changes: object) -> None:
    """Set (or, with value None, delete) top-level keys of a dataset.json."""
    path = root / "dataset.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


@pytest.fixture
def tiny(paths: Paths) -> Path:
    """A fresh valid 3-case single-channel dataset under ``paths.raw``."""
    return make_tiny_dataset(paths.raw)
