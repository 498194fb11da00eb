"""Saved probabilities: CASE.npz + its CASE.json sidecar, reading them back, and ensembling folders of them."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_bytes, load_record, save_record
from autoseg.common.progress import progress
from autoseg.dataset.io import Geometry, write_image
from autoseg.dataset.spec import LabelScheme, LabelValue

log = logging.getLogger(__name__)

PROBABILITY_KEY = "probabilities"
"""Array name inside CASE.npz."""

@dataclass(frozen=True)
class ProbabilityRecord:
    """Sidecar of CASE.npz: which case, which geometry, which labels; written after the npz."""

    SCHEMA: ClassVar[str] = "autoseg.probabilities"
    VERSION: ClassVar[int] = 1

    case_id: str
    geometry: Geometry
    labels: dict[str, LabelValue]
    file_ending: str
    sources: tuple[str, ...] = ()
    regions_class_order: tuple[int, ...] = ()
    """Region probabilities only: how they become a label map (see `LabelScheme`)."""

    @property
    def label_scheme(self) -> LabelScheme:
        return LabelScheme.from_labels(self.labels, self.regions_class_order)


@dataclass(frozen=True)
class FolderResult:
    """What `predict_folder` did."""

    written: tuple[str, ...]
    skipped: tuple[str, ...]
    output_dir: Path
    notes: tuple[str, ...] = field(default_factory=tuple)


def labels_from_probabilities(probs: np.ndarray, scheme: LabelScheme | None = None) -> np.ndarray:
    """The label map as the smallest unsigned integer type that holds the labels.

    Argmax over classes; with a region ``scheme``, regions_class_order (`LabelScheme.label_map`).
    """
    if scheme is not None:
        return scheme.label_map(probs)
    dtype = np.uint8 if probs.shape[0] <= 256 else np.uint16
    return np.argmax(probs, axis=0).astype(dtype)


def _save_npz(path: Path, probs: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{PROBABILITY_KEY: probs.astype(np.float16)})
    atomic_write_bytes(path, buf.getvalue())


def write_probabilities(out_dir: Path, case_id: str, probs: np.ndarray, geometry: Geometry,
                       labels: dict[str, LabelValue], ending: str, sources: Sequence[str] = (),
                       regions_class_order: Sequence[int] = ()) -> None:
    """CASE.npz then CASE.json (the json marks the pair complete)."""
    _save_npz(Path(out_dir) / f"{case_id}.npz", probs)
    save_record(Path(out_dir) / f"{case_id}.json",
                ProbabilityRecord(case_id, geometry, dict(labels), ending, tuple(sources),
                                  tuple(regions_class_order)))


def load_probabilities(folder: Path, case_id: str) -> tuple[np.ndarray, ProbabilityRecord]:
    """Read CASE.npz + CASE.json written by `write_probabilities` or `predict_folder`."""
    rec = load_record(Path(folder) / f"{case_id}.json", ProbabilityRecord)
    npz = Path(folder) / f"{case_id}.npz"
    if not npz.is_file():
        raise AutosegError("probability file missing next to its json", npz)
    with np.load(npz) as z:
        probs = z[PROBABILITY_KEY].astype(np.float32)
    if tuple(probs.shape[1:]) != tuple(rec.geometry.shape):
        raise AutosegError(f"probabilities shape {probs.shape} does not match geometry {rec.geometry.shape}", npz)
    return probs, rec


def ensemble_probabilities(folders: Sequence[Path], output_dir: Path, force: bool = False,
                           save_probabilities: bool = False, postprocess=None,
                           show_progress: bool = True) -> FolderResult:
    """Average saved probabilities of several prediction folders (same cases) and write label maps."""
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise AutosegError("ensembling needs at least two folders")
    per_folder = []
    for f in folders:
        if not f.is_dir():
            raise AutosegError("folder not found", f)
        per_folder.append({p.stem for p in f.glob("*.json") if (f / f"{p.stem}.npz").is_file()})
    common = set.intersection(*per_folder)
    if not common:
        raise AutosegError("no case has saved probabilities (CASE.npz + CASE.json) in every folder "
                           "(predict with --save-probabilities)", folders[0])
    for f, ids in zip(folders, per_folder):
        if ids != common:
            log.warning("%s: %d case(s) not present in every folder are left out", f, len(ids - common))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for cid in progress(sorted(common), total=len(common), desc="ensemble", enabled=show_progress, unit="case"):
        total, rec0 = None, None
        for f in folders:
            probs, rec = load_probabilities(f, cid)
            if rec0 is None:
                rec0 = rec
            elif (rec.labels, rec.regions_class_order) != (rec0.labels, rec0.regions_class_order) or rec.geometry.differences(rec0.geometry):
                raise AutosegError(f"case {cid!r}: labels or geometry differ from {folders[0]}", f / f"{cid}.json")
            total = probs if total is None else total + probs
        out = output_dir / f"{cid}{rec0.file_ending}"
        if out.exists() and not force:
            skipped.append(cid)
            continue
        mean = total / len(folders)
        seg = labels_from_probabilities(mean, rec0.label_scheme)
        if postprocess is not None:
            seg = postprocess(seg)
        if save_probabilities:
            write_probabilities(output_dir, cid, mean, rec0.geometry, rec0.labels, rec0.file_ending,
                                regions_class_order=rec0.regions_class_order)
        write_image(out, seg, rec0.geometry)
        written.append(cid)
    return FolderResult(written=tuple(written), skipped=tuple(skipped), output_dir=output_dir)
