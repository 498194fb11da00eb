"""Convert a Medical Segmentation Decathlon task folder into an nnU-Net v2 raw dataset.

MSD layout (``TaskXX_Name/``)::

    dataset.json   {"name", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": ...},
                    "training": [{"image": ..., "label": ...}], "test": [...]}
    imagesTr/CASE.nii.gz   3D single-channel, or 4D with the channels on the 4th axis
    labelsTr/CASE.nii.gz
    imagesTs/CASE.nii.gz   (optional)

becomes ``raw_root/DatasetXXX_Name/`` with one 3D file per channel (``CASE_0000.nii.gz``,
``CASE_0001.nii.gz``, ...), labels under the same case id, and an nnU-Net v2 dataset.json.
A 3D single-channel file is copied byte for byte (fast, exact); a 4D file is split with
SimpleITK, keeping the spacing, origin and direction of its first three axes.

The dataset is built in a hidden temp folder next to the target and renamed into place at
the end, so an interrupted conversion never leaves a half dataset that looks complete.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.common.errors import AutosegError, DatasetError
from autoseg.common.jsonio import atomic_write_json, read_json
from autoseg.common.paths import DATASET_NAME_RE, dataset_name
from autoseg.common.procs import spawn_pool
from autoseg.common.progress import progress
from autoseg.dataset.io import read_sitk_image
from autoseg.dataset.spec import load_dataset

log = logging.getLogger(__name__)

MSD_ENDING = ".nii.gz"
"""Every MSD task stores gzipped NIfTI."""

MSD_REQUIRED_KEYS = ("modality", "labels")
"""MSD dataset.json keys the conversion needs (cases are found on disk, like nnU-Net does)."""

MSD_INFO_KEYS = ("description", "reference", "licence", "release", "relase", "tensorImageSize")
"""Descriptive MSD keys carried over to the new dataset.json as they are ("relase" is MSD's typo)."""

TASK_PREFIX_RE = re.compile(r"^Task\d+_")
"""MSD folder names look like ``Task04_Hippocampus``."""

CASES_PER_TASK = 4
"""Cases handed to a worker at once (small files: batching amortizes inter-process cost)."""


@dataclass(frozen=True)
class _CaseJob:
    """One MSD case to convert: source files and the target folder."""

    case_id: str
    image: Path
    label: Path | None
    out_dir: Path
    test: bool


def convert_msd(task_dir: str | Path, raw_root: str | Path, dataset_id: int, name: str | None = None,
                force: bool = False, num_workers: int = 1, show_progress: bool = True) -> Path:
    """Convert an MSD task folder into ``raw_root/DatasetXXX_Name``; returns that folder.

    ``name`` defaults to the MSD ``name`` field, else the folder name without ``TaskXX_``.
    Refuses to replace an existing dataset unless ``force``; another dataset with the same
    id under a different name is always refused (ids must be unique to resolve ``-d 4``).
    """
    task_dir, raw_root = Path(task_dir), Path(raw_root)
    if not 0 < dataset_id < 1000:
        raise AutosegError(f"dataset id must be between 1 and 999, got {dataset_id}")
    meta = _read_msd_json(task_dir)
    if name is None:
        name = str(meta.get("name") or TASK_PREFIX_RE.sub("", task_dir.name)).strip().replace(" ", "_")
    target = raw_root / dataset_name(dataset_id, name)
    _check_target(target, raw_root, dataset_id, force)
    n_channels = len(meta["modality"])
    jobs_tr, jobs_ts = _find_cases(task_dir)
    if not jobs_tr:
        raise DatasetError(f"no training images (*{MSD_ENDING}) in imagesTr/", task_dir / "imagesTr")

    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".converting", dir=raw_root))
    try:
        jobs = [_CaseJob(c, img, lab, tmp, lab is None) for c, img, lab in jobs_tr + jobs_ts]
        for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if jobs_ts else ()):
            (tmp / sub).mkdir()
        _run_all(jobs, n_channels, num_workers, show_progress)
        atomic_write_json(tmp / "dataset.json", _nnunet_json(meta, name, len(jobs_tr), task_dir))
        load_dataset(tmp)  # self-check: the result must pass our own structural checks
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s -> %s (%d training, %d test cases)", task_dir, target, len(jobs_tr), len(jobs_ts))
    return target


def _read_msd_json(task_dir: Path) -> dict:
    """The MSD dataset.json, with the keys the conversion needs checked."""
    path = task_dir / "dataset.json"
    if not task_dir.is_dir():
        raise DatasetError("MSD task folder not found", task_dir)
    try:
        meta = read_json(path)
    except AutosegError as e:
        raise DatasetError(e.message, path) from None
    if not isinstance(meta, dict):
        raise DatasetError("dataset.json must hold a JSON object", path)
    missing = [k for k in MSD_REQUIRED_KEYS if k not in meta]
    if missing:
        raise DatasetError(f"missing MSD key(s) {', '.join(missing)} (is this an MSD task folder?)", path)
    for key in MSD_REQUIRED_KEYS:
        entries = meta[key]
        if not isinstance(entries, dict) or not entries or not all(str(k).isdigit() for k in entries):
            raise DatasetError(f"'{key}' must be an object like {{\"0\": ...}}", path)
        if sorted(int(k) for k in entries) != list(range(len(entries))):
            raise DatasetError(f"'{key}' keys must be consecutive from 0, got {list(entries)}", path)
    names = [str(v) for v in meta["labels"].values()]
    if len(set(names)) != len(names):
        raise DatasetError(f"label names must be unique, got {names}", path)
    return meta


def _check_target(target: Path, raw_root: Path, dataset_id: int, force: bool) -> None:
    """Refuse to overwrite without ``force``, and never create a second dataset with one id."""
    if target.exists() and not force:
        raise AutosegError("dataset already exists; pass --force to replace it", target)
    if raw_root.is_dir():
        for child in raw_root.iterdir():
            m = DATASET_NAME_RE.match(child.name)
            if m and int(m.group(1)) == dataset_id and child.name != target.name:
                raise AutosegError(f"dataset id {dataset_id:03d} is already used by {child.name}; "
                                   "choose another --id or remove that folder", child)


def _is_junk(path: Path) -> bool:
    """Hidden files and macOS resource forks (``._CASE.nii.gz``) shipped in some MSD archives."""
    return path.name.startswith(".")


def _find_cases(task_dir: Path) -> tuple[list[tuple[str, Path, Path | None]], list[tuple[str, Path, None]]]:
    """(case id, image, label) for training, (case id, image, None) for test, sorted by id."""
    def images(folder: Path) -> list[tuple[str, Path]]:
        if not folder.is_dir():
            return []
        return sorted((f.name[: -len(MSD_ENDING)], f) for f in folder.iterdir()
                      if f.name.endswith(MSD_ENDING) and not _is_junk(f))

    training = []
    for case_id, img in images(task_dir / "imagesTr"):
        label = task_dir / "labelsTr" / f"{case_id}{MSD_ENDING}"
        if not label.is_file():
            raise DatasetError(f"training case {case_id!r} has no label file", label)
        training.append((case_id, img, label))
    test = [(case_id, img, None) for case_id, img in images(task_dir / "imagesTs")]
    return training, test


def _run_all(jobs: list[_CaseJob], n_channels: int, num_workers: int, show_progress: bool) -> None:
    work = partial(convert_case, n_channels=n_channels)
    bar = {"total": len(jobs), "desc": "convert", "unit": "case", "enabled": show_progress}
    if num_workers <= 1 or len(jobs) <= 1:
        for job in progress(jobs, **bar):
            work(job)
        return
    with spawn_pool(min(num_workers, len(jobs))) as pool:
        for _ in progress(pool.map(work, jobs, chunksize=CASES_PER_TASK), **bar):
            pass


def convert_case(job: _CaseJob, n_channels: int) -> None:
    """Write one case's channel files (and label) in nnU-Net naming under ``job.out_dir``."""
    img_dir = job.out_dir / ("imagesTs" if job.test else "imagesTr")
    dim, components = _image_info(job.image)
    if components != 1:
        raise DatasetError(f"image has {components} components per voxel; expected scalar voxels", job.image)
    if dim == 3:
        if n_channels != 1:
            raise DatasetError(f"image is 3D (one channel) but dataset.json 'modality' declares "
                               f"{n_channels} channels", job.image)
        shutil.copyfile(job.image, img_dir / f"{job.case_id}_0000{MSD_ENDING}")
    elif dim == 4:
        _split_4d(job, img_dir, n_channels)
    else:
        raise DatasetError(f"image is {dim}D; MSD images are 3D or 4D", job.image)
    if job.label is not None:
        label_dim, _ = _image_info(job.label)
        if label_dim != 3:
            raise DatasetError(f"label is {label_dim}D; a label must be one 3D image", job.label)
        shutil.copyfile(job.label, job.out_dir / "labelsTr" / f"{job.case_id}{MSD_ENDING}")


def _image_info(path: Path) -> tuple[int, int]:
    """(dimension, components per voxel) from the header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DatasetError(f"unreadable image ({str(e).strip().splitlines()[-1][:120]})", path) from None
    return reader.GetDimension(), reader.GetNumberOfComponents()


def _split_4d(job: _CaseJob, img_dir: Path, n_channels: int) -> None:
    """One 3D file per channel (4th axis), keeping the geometry of the first three axes."""
    img = read_sitk_image(job.image)
    arr = sitk.GetArrayFromImage(img)  # (c, z, y, x)
    if arr.shape[0] != n_channels:
        raise DatasetError(f"image has {arr.shape[0]} channels on its 4th axis but dataset.json "
                           f"'modality' declares {n_channels}", job.image)
    direction = np.array(img.GetDirection()).reshape(4, 4)[:3, :3]
    for c in range(n_channels):
        out = sitk.GetImageFromArray(np.ascontiguousarray(arr[c]))
        out.SetSpacing(img.GetSpacing()[:3])
        out.SetOrigin(img.GetOrigin()[:3])
        out.SetDirection(tuple(float(v) for v in direction.ravel()))
        sitk.WriteImage(out, str(img_dir / f"{job.case_id}_{c:04d}{MSD_ENDING}"), useCompression=True)


def _nnunet_json(meta: dict, name: str, num_training: int, task_dir: Path) -> dict:
    """The nnU-Net v2 dataset.json for the converted data (label 0 is always "background")."""
    labels = {("background" if int(k) == 0 else str(v)): int(k)
              for k, v in sorted(meta["labels"].items(), key=lambda kv: int(kv[0]))}
    out = {
        "name": name,
        "channel_names": {str(int(k)): str(v) for k, v in sorted(meta["modality"].items(),
                                                                 key=lambda kv: int(kv[0]))},
        "labels": labels,
        "numTraining": num_training,
        "file_ending": MSD_ENDING,
    }
    out.update({k: meta[k] for k in MSD_INFO_KEYS if k in meta})
    out["converted_from"] = f"MSD {task_dir.name}"
    return out


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder to ``target``, replacing an old one only after it is complete."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
