"""Full verification of a raw dataset: every file opened, every problem reported at once.

`load_dataset` stops at the first structural problem and reads no image, which is right for
callers that only need the file list. Before planning, the user needs the whole list of
what is wrong, so `verify_dataset` collects the structural problems (dataset.json keys,
label declarations, missing channels or labels, ``numTraining``) and then reads every image
and label and checks:

- each file is readable, single-channel and 2D/3D (a 4D label is an error);
- the channels of a case share one grid, and the label lies on that grid
  (shape, spacing, origin, direction, within `GEOMETRY_RTOL` / `GEOMETRY_ATOL`);
- images hold no NaN / Inf;
- label values are integers (float labels with integral values are fine, as in two real
  Hippocampus cases) and are declared in dataset.json's ``labels`` (an ``"ignore"`` label
  counts as declared; its value rule is checked with the other declarations);
- all cases have the same dimensionality (2D or 3D);
- some training label holds foreground (a dataset of background-only labels cannot be trained).

Files that do not end in ``file_ending`` are ignored with one warning, as nnU-Net ignores them.

Problems are `DatasetError`s with ``where=`` the file; all of them are raised together as
one `DatasetErrors`.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.common.errors import DatasetError, DatasetErrors
from autoseg.common.procs import spawn_pool
from autoseg.common.progress import progress
from autoseg.dataset.io import GZIP_MAGIC, Geometry, parse_nifti_header, read_image
from autoseg.dataset.spec import CaseFiles, DatasetSpec, ProblemCollector, scan_dataset

log = logging.getLogger(__name__)

GEOMETRY_RTOL = 1e-4
"""Relative tolerance for spacing / origin / direction agreement between a case's files."""

GEOMETRY_ATOL = 1e-3
"""Absolute tolerance (mm for spacing and origin): NIfTI stores geometry as float32."""

MAX_UNDECLARED_REPORTS = 10
"""Undeclared-label problems listed one by one; beyond this (usually a wrong 'labels'), one summary line."""

CASES_PER_TASK = 4
"""Cases handed to a worker at once: small files, so batching amortizes the inter-process cost."""


@dataclass(frozen=True)
class CaseCheck:
    """What reading one case found: its problems (message, file), label values and dimensionality."""

    case_id: str
    problems: tuple[tuple[str, str], ...]
    label_values: tuple[float, ...]
    file_ndim: int | None


def verify_dataset(root: str | Path, num_workers: int = 1, show_progress: bool = True) -> DatasetSpec:
    """Check a raw dataset completely; return its spec, or raise `DatasetErrors` listing every problem.

    Reads every training image and label (and every test image), in ``num_workers`` processes
    when more than one. Run it before fingerprinting: a bad file found after an hour of
    planning or training costs far more than reading each file once.
    """
    root = Path(root)
    problems = ProblemCollector(fail_fast=False)
    spec = scan_dataset(root, problems)
    if spec is None:
        raise DatasetErrors(problems.problems)
    declared = {*spec.label_scheme.label_values, *(() if spec.ignore_label is None else (spec.ignore_label,))}
    cases = list(spec.cases) + list(spec.test_cases)
    checks = _check_all(cases, num_workers, show_progress)
    dims: dict[int, list[str]] = {}
    undeclared_files = 0
    for check in checks:
        problems.extend([DatasetError(msg, where) for msg, where in check.problems])
        undeclared = sorted(v for v in check.label_values if v not in declared)
        if undeclared and spec.labels:
            undeclared_files += 1
            if undeclared_files <= MAX_UNDECLARED_REPORTS:
                problems.add(f"label value(s) {_fmt_values(undeclared)} not declared in dataset.json 'labels' "
                             f"(declared: {sorted(declared)})", spec.case(check.case_id).label or root)
        if check.file_ndim is not None:
            dims.setdefault(check.file_ndim, []).append(check.case_id)
    if undeclared_files > MAX_UNDECLARED_REPORTS:
        problems.add(f"{undeclared_files - MAX_UNDECLARED_REPORTS} more label file(s) hold values not declared "
                     "in dataset.json 'labels'", root / "labelsTr")
    if not _any_foreground(checks[:len(spec.cases)], spec.ignore_label):
        problems.add("no training label contains any foreground class (every voxel is background"
                     + (" or ignore" if spec.ignore_label is not None else "") + "); nothing to train on",
                     root / "labelsTr")
    if len(dims) > 1:
        minority = min(dims, key=lambda d: len(dims[d]))
        problems.add(f"cases mix 2D and 3D images; {len(dims[minority])} case(s) are {minority}D, "
                     f"e.g. {dims[minority][0]!r}", root / "imagesTr")
    if problems.problems:
        raise DatasetErrors(problems.problems)
    found = sorted({v for c in checks for v in c.label_values})
    missing = sorted(declared - set(found))
    if missing and spec.cases:
        log.warning("%s: declared label value(s) %s occur in no training label", spec.name, missing)
    log.info("%s: %d training case(s), %d test case(s) verified", spec.name, len(spec.cases), len(spec.test_cases))
    return spec


def _any_foreground(training: list[CaseCheck], ignore: int | None) -> bool:
    """Whether some readable training label holds a value other than background 0 and the ignore label.

    Labels that could not be read (no values) are already reported and do not count; when none
    could be read, there is nothing to judge. Some cases without foreground are fine (nnU-Net
    samples foreground from the others); none at all cannot be trained.
    """
    read = [c for c in training if c.label_values]
    return not read or any(v not in (0, ignore) for c in read for v in c.label_values)


def _check_all(cases: list[CaseFiles], num_workers: int, show_progress: bool) -> list[CaseCheck]:
    """Check every case, in a process pool when ``num_workers > 1``, in input order."""
    bar = {"total": len(cases), "desc": "verify", "unit": "case", "enabled": show_progress}
    if num_workers <= 1 or len(cases) <= 1:
        return [check_case(c) for c in progress(cases, **bar)]
    with spawn_pool(min(num_workers, len(cases))) as pool:
        return list(progress(pool.map(check_case, cases, chunksize=CASES_PER_TASK), **bar))


def check_case(case: CaseFiles) -> CaseCheck:
    """Read one case's channels and label; report every problem found (never raises for bad data)."""
    problems: list[tuple[str, str]] = []
    ref: Geometry | None = None
    ref_file: Path | None = None
    for f in case.images:
        try:
            arr, geom = read_image(f)
            nonfinite = count_nonfinite(f, arr)
        except DatasetError as e:
            problems.append((e.message, str(f)))
            continue
        if nonfinite:
            problems.append((f"image holds {nonfinite} NaN/Inf voxel(s)", str(f)))
        if ref is None:
            ref, ref_file = geom, f
        else:
            diffs = ref.differences(geom, rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL)
            if diffs:
                problems.append((f"channel geometry differs from {ref_file.name}: {'; '.join(diffs)}", str(f)))
    values: tuple[float, ...] = ()
    if case.label is not None:
        values = _check_label(case.label, ref, ref_file, problems)
    return CaseCheck(case.case_id, tuple(problems), values, None if ref is None else ref.file_ndim)


NIFTI_FLOAT_DTYPES = {16: "f4", 64: "f8"}
"""NIfTI ``datatype`` codes of float voxels (FLOAT32, FLOAT64) and their numpy codes."""


def count_nonfinite(path: Path, arr: np.ndarray) -> int:
    """NaN/Inf voxels of an image file, counted in the stored data.

    ITK's NIfTI reader replaces NaN/Inf by 0 while reading, so for NIfTI the voxels are
    counted in the file itself (header fields at their fixed NIfTI-1/2 offsets); other
    formats are read faithfully and ``arr`` is checked directly.
    """
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            return bad
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return 0
    try:  # read_image has checked the file is complete; a file changed since then is still one line
        with open(path, "rb") as f:
            gzipped = f.read(2) == GZIP_MAGIC
        with (gzip.open if gzipped else open)(path, "rb") as f:
            header = parse_nifti_header(f.read(540))
            if header is None or header.datatype not in NIFTI_FLOAT_DTYPES:
                return 0  # integer voxels cannot be NaN/Inf: no need to decompress the rest
            f.seek(0)
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"unreadable image ({type(e).__name__}: {e})", path) from None
    dtype = np.dtype(f"{header.byte_order}{NIFTI_FLOAT_DTYPES[header.datatype]}")
    count = max(0, min(arr.size, (len(raw) - header.vox_offset) // dtype.itemsize))
    return int(np.count_nonzero(~np.isfinite(np.frombuffer(raw, dtype, count, header.vox_offset))))


def _check_label(label: Path, ref: Geometry | None, ref_file: Path | None,
                 problems: list[tuple[str, str]]) -> tuple[float, ...]:
    """Label readable, on the image's grid, integer-valued; returns its distinct values."""
    try:
        arr, geom = read_image(label)
        nonfinite = count_nonfinite(label, arr)
    except DatasetError as e:
        problems.append((e.message, str(label)))
        return ()
    if ref is not None:
        diffs = ref.differences(geom, rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL)
        if diffs:
            problems.append((f"label geometry differs from image {ref_file.name}: {'; '.join(diffs)}", str(label)))
    if nonfinite:
        problems.append((f"label holds {nonfinite} NaN/Inf voxel(s)", str(label)))
    values = np.unique(arr)
    if np.issubdtype(values.dtype, np.floating):
        bad = values[~np.isfinite(values) | (values != np.round(values))]
        if bad.size:
            problems.append((f"label holds non-integer value(s) {_fmt_values(bad[:5].tolist())}", str(label)))
            values = values[np.isfinite(values) & (values == np.round(values))]
    return tuple(float(v) for v in values)


def _fmt_values(values: list[float]) -> str:
    """[1.0, 2.5] -> '1, 2.5' (integral floats printed as integers)."""
    return ", ".join(str(int(v)) if float(v).is_integer() else f"{v:g}" for v in values)
