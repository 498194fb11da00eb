"""The files of a data folder: each preprocessed case's arrays and properties, and the folder's settings.

Per case (CASE.json last, so a case is complete exactly when its json exists): CASE.npy,
CASE_seg.npy, CASE_fg.npz and CASE.json (`case_files`); per folder ``preprocessing.json``
(`PreprocessingSettings`), which the data loader checks too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_with, load_record, save_record
from autoseg.dataset.spec import LabelValue
from autoseg.planning.plans import ChannelNormalization
from autoseg.preprocess.case import CaseProperties

SETTINGS_FILENAME = "preprocessing.json"
"""Record, in each data folder, of the settings the cases there were made with."""


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


def median_preprocessed_shape(folder: Path) -> tuple[int, ...] | None:
    """Median (transposed) shape of the complete cases in a data folder; None when it has none."""
    shapes = [load_record(case_files(folder, c)["json"], CaseProperties).shape_after_resampling
              for c in list_preprocessed_cases(folder)]
    if not shapes:
        return None
    return tuple(int(v) for v in np.median(np.array(shapes), axis=0))
