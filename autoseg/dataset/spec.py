"""The in-memory description of a raw dataset in nnU-Net v2 layout.

    DatasetXXX_Name/
      dataset.json      {"channel_names": {"0": "CT"}, "labels": {"background": 0, ...},
                         "numTraining": N, "file_ending": ".nii.gz"}
      imagesTr/CASE_0000.nii.gz  (one file per channel: _0000, _0001, ...)
      labelsTr/CASE.nii.gz
      imagesTs/          (optional)

`load_dataset` reads dataset.json and pairs the files; it raises on the first structural
problem. `autoseg.dataset.verify` goes further (reads every image) and reports every problem.

Sparse annotations use nnU-Net v2's ignore label: a ``labels`` key named exactly
``"ignore"`` whose value is one above the highest other label (``{"background": 0,
"organ": 1, "ignore": 2}``). Its voxels are unannotated: no loss, no metric, no network
output channel. `ignore_label` and `class_labels` read a labels dict the same way in every
stage (spec, fingerprint, plan, evaluation).

Region-based training (nnU-Net v2, BraTS style): a ``labels`` value may be a list of label
values, a region (``{"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}``);
with any region, every foreground entry is a region (an int is a one-value region),
``regions_class_order`` is required (one label value per region, in ``labels`` order), and
the network gets one sigmoid output per region. `LabelScheme` is the one place that knows
classes from regions, the number of network outputs, and the conversions between label
maps, region targets and predicted label maps.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.common.errors import AutosegError, DatasetError
from autoseg.common.jsonio import read_json
from autoseg.dataset.io import SUPPORTED_ENDINGS

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
"""dataset.json keys nnU-Net v2 requires; we require the same ones."""

CHANNEL_SUFFIX_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

IGNORE_KEY = "ignore"
"""The ``labels`` name nnU-Net v2 reserves for unannotated voxels (sparse annotation)."""


REGION_THRESHOLD = 0.5
"""A voxel belongs to a region where its sigmoid probability exceeds this (nnU-Net's rule)."""

LabelValue = int | tuple[int, ...]
"""A ``labels`` value: one label value (a class) or a tuple of them (a region)."""


def ignore_label(labels: Mapping[str, Any]) -> int | None:
    """The ignore label's value in a dataset.json ``labels`` dict, or None when it declares none."""
    value = labels.get(IGNORE_KEY)
    return None if value is None else int(value)


def class_labels(labels: Mapping[str, Any]) -> dict[str, Any]:
    """The labels the network predicts: every declared label except the ignore label."""
    return {name: v for name, v in labels.items() if name != IGNORE_KEY}


def _values(value: Any) -> tuple[int, ...]:
    """A labels entry as the tuple of label values it covers."""
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


@dataclass(frozen=True)
class LabelScheme:
    """What the network predicts for a ``labels`` dict: softmax classes or sigmoid regions.

    Classes: one output per class, background included, argmax gives the label map.
    Regions: one output per foreground region (no background output); a voxel is in a region
    where its probability > `REGION_THRESHOLD`, and the label map writes
    ``regions_class_order[i]`` where region ``i`` is on, later regions overwriting earlier ones
    (nnU-Net's ``convert_probabilities_to_segmentation``).
    """

    labels: dict[str, LabelValue]
    regions_class_order: tuple[int, ...] = ()

    @classmethod
    def from_labels(cls, labels: Mapping[str, Any], regions_class_order: Sequence[int] = ()) -> "LabelScheme":
        """Normalize lists to tuples; ``regions_class_order`` is only needed to build label maps."""
        norm = {str(k): (tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else int(v))
                for k, v in labels.items()}
        return cls(norm, tuple(int(v) for v in regions_class_order))

    @property
    def has_regions(self) -> bool:
        return any(isinstance(v, tuple) for v in class_labels(self.labels).values())

    @property
    def ignore_label(self) -> int | None:
        return ignore_label(self.labels)

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every value a training label map holds (background included, the ignore label not), sorted."""
        return tuple(sorted({x for v in class_labels(self.labels).values() for x in _values(v)}))

    @property
    def foreground(self) -> dict[str, tuple[int, ...]]:
        """Name -> label values of each foreground class or region, in network output order."""
        items = [(n, _values(v)) for n, v in class_labels(self.labels).items() if set(_values(v)) != {0}]
        if not self.has_regions:
            items.sort(key=lambda kv: kv[1])
        return dict(items)

    @property
    def regions(self) -> tuple[tuple[int, ...], ...]:
        """The foreground regions in output order (empty for classes)."""
        return tuple(self.foreground.values()) if self.has_regions else ()

    @property
    def num_outputs(self) -> int:
        """Network output channels: one per class (background included) or one per region."""
        return len(self.foreground) if self.has_regions else len(class_labels(self.labels))

    @property
    def eval_targets(self) -> dict[int | str, tuple[int, ...]]:
        """What evaluation scores, keyed as in summary.json: class value -> (value,), or region name -> values."""
        if self.has_regions:
            return dict(self.foreground)
        return {v[0]: v for v in self.foreground.values()}

    def region_targets(self, seg: Any) -> Any:
        """Label map ``(B, 1, *spatial)`` -> float region masks ``(B, R, *spatial)`` (torch or numpy)."""
        lib = np if isinstance(seg, np.ndarray) else _torch()
        seg = seg[:, 0] if seg.ndim >= 3 and seg.shape[1] == 1 else seg
        masks = []
        for values in self.regions:
            m = seg == values[0]
            for v in values[1:]:
                m = m | (seg == v)
            masks.append(m)
        out = lib.stack(masks, 1)
        return out.astype(np.float32) if lib is np else out.float()

    def label_map(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities ``(K, *spatial)`` -> label map: argmax, or regions_class_order for regions."""
        if not self.has_regions:
            dtype = np.uint8 if probs.shape[0] <= 256 else np.uint16
            return np.argmax(probs, axis=0).astype(dtype)
        if len(self.regions_class_order) != probs.shape[0]:
            raise AutosegError(f"{probs.shape[0]} region probabilities but regions_class_order "
                               f"{list(self.regions_class_order)}", "regions_class_order")
        dtype = np.uint8 if max(self.regions_class_order, default=0) < 256 else np.uint16
        seg = np.zeros(probs.shape[1:], dtype=dtype)
        for i, value in enumerate(self.regions_class_order):
            seg[probs[i] > REGION_THRESHOLD] = value
        return seg


def _torch() -> Any:
    import torch  # only the training and inference paths pass tensors; the dataset stage stays torch-free

    return torch


@dataclass(frozen=True)
class CaseFiles:
    """One case: its id, one image file per channel (in channel order) and its label (None in imagesTs)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True)
class DatasetSpec:
    """A raw dataset as declared by dataset.json and found on disk."""

    name: str
    root: Path
    channel_names: dict[int, str]
    labels: dict[str, LabelValue]
    num_training: int
    file_ending: str
    cases: tuple[CaseFiles, ...]
    test_cases: tuple[CaseFiles, ...] = ()
    regions_class_order: tuple[int, ...] = ()
    """dataset.json ``regions_class_order`` (region-based training only)."""

    @property
    def label_scheme(self) -> LabelScheme:
        return LabelScheme.from_labels(self.labels, self.regions_class_order)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def ignore_label(self) -> int | None:
        """Value marking unannotated voxels (dataset.json ``"ignore"``), None when not declared."""
        return ignore_label(self.labels)

    @property
    def foreground_labels(self) -> tuple[int, ...]:
        """Label values other than background (0) and the ignore label, sorted."""
        return tuple(v for v in self.label_scheme.label_values if v != 0)

    @property
    def num_classes(self) -> int:
        """Number of network output channels (classes: background included; regions: one each)."""
        return self.label_scheme.num_outputs

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    def case(self, case_id: str) -> CaseFiles:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise DatasetError(f"no training case {case_id!r}", self.root)


class ProblemCollector:
    """Collects dataset problems; with ``fail_fast`` it raises the first one instead.

    The structural checks are written once against this collector: `load_dataset` uses it
    fail-fast (callers want the first problem, quickly), `verify_dataset` collects them all.
    """

    def __init__(self, fail_fast: bool) -> None:
        self.fail_fast = fail_fast
        self.problems: list[DatasetError] = []

    def add(self, message: str, where: str | Path) -> None:
        """Record one problem (or raise it at once in fail-fast mode)."""
        err = DatasetError(message, where)
        if self.fail_fast:
            raise err
        self.problems.append(err)

    def extend(self, errors: list[DatasetError]) -> None:
        for e in errors:
            self.add(e.message, e.where or "")


def _check_dataset_json(root: Path, problems: ProblemCollector) -> dict | None:
    """dataset.json as a dict, each key problem reported; None when it cannot be used at all."""
    path = Path(root) / "dataset.json"
    if not path.exists():
        problems.add("missing dataset.json", path)
        return None
    try:
        meta = read_json(path)
    except AutosegError as e:
        problems.add(e.message, path)
        return None
    if not isinstance(meta, dict):
        problems.add("dataset.json must hold a JSON object", path)
        return None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        problems.add(f"missing required key(s) {', '.join(missing)}", path)
    usable = not missing
    channels = meta.get("channel_names")
    if "channel_names" in meta:
        if not isinstance(channels, dict) or not channels:
            problems.add("'channel_names' must be a non-empty object like {\"0\": \"CT\"}", path)
            usable = False
        elif not all(str(k).isdigit() for k in channels) or sorted(int(k) for k in channels) != list(
                range(len(channels))):
            problems.add("'channel_names' keys must be consecutive channel indices \"0\", \"1\", ..., "
                         f"got {list(channels)}", path)
            usable = False
    if "labels" in meta:
        _check_labels(meta["labels"], path, problems, meta.get("regions_class_order"))
    if "numTraining" in meta and (not isinstance(meta["numTraining"], int) or isinstance(meta["numTraining"], bool)):
        problems.add(f"'numTraining' must be an integer, got {meta['numTraining']!r}", path)
    if "file_ending" in meta:
        ending = meta["file_ending"]
        if not isinstance(ending, str) or ending.lower() not in SUPPORTED_ENDINGS:
            problems.add(f"unsupported file_ending {ending!r} (supported: {', '.join(SUPPORTED_ENDINGS)})", path)
            usable = False
    return meta if usable else None


def _check_labels(labels: object, path: Path, problems: ProblemCollector,
                  regions_class_order: object = None) -> None:
    """Labels map names to integers (or regions), include background 0, and are consecutive from 0.

    An ``"ignore"`` label is left out of the consecutive rule and must be exactly one above
    the highest other label (nnU-Net's rule: the network has one channel per other label,
    so the ignore value is the first one it cannot predict). With regions, the values they
    cover together must be consecutive, and ``regions_class_order`` must give one label value
    per foreground region (see `LabelScheme`).
    """
    if not isinstance(labels, dict) or "background" not in labels:
        problems.add("'labels' must be an object that includes \"background\": 0", path)
        return
    ok = True
    for name, value in labels.items():
        if isinstance(value, (list, tuple)) and name not in ("background", IGNORE_KEY):
            if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                problems.add(f"region {name!r} must be a non-empty list of integer labels, got {value!r}", path)
                ok = False
        elif isinstance(value, bool) or not isinstance(value, int):
            problems.add(f"label {name!r} must map to an integer"
                         + ("" if name in ("background", IGNORE_KEY) else " or a list of integers (a region)")
                         + f", got {value!r}", path)
            ok = False
    if not ok:
        return
    if labels["background"] != 0:
        problems.add(f"'background' must be label 0, got {labels['background']}", path)
        return
    scheme = LabelScheme.from_labels(labels)
    others = list(scheme.label_values)
    if others != list(range(len(others))):
        problems.add(f"label values must be consecutive integers from 0, got {others}"
                     + (" (not counting 'ignore')" if IGNORE_KEY in labels else ""), path)
    elif IGNORE_KEY in labels and labels[IGNORE_KEY] != len(others):
        problems.add(f"'ignore' must be the highest label value, {len(others)} (one above the "
                     f"other labels 0..{len(others) - 1}), got {labels[IGNORE_KEY]}", path)
    if scheme.has_regions:
        _check_regions_class_order(regions_class_order, len(scheme.regions), others, path, problems)


def _check_regions_class_order(order: object, n_regions: int, values: list[int], path: Path,
                               problems: ProblemCollector) -> None:
    """One foreground label value per region: what a voxel inside that region is written as."""
    if order is None:
        problems.add("'labels' declares regions (lists of labels), so 'regions_class_order' is required: "
                     f"one label value per region, e.g. {list(range(1, n_regions + 1))}", path)
    elif not isinstance(order, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in order):
        problems.add(f"'regions_class_order' must be a list of integer labels, got {order!r}", path)
    elif len(order) != n_regions:
        problems.add(f"'regions_class_order' has {len(order)} entries but 'labels' declares {n_regions} "
                     "foreground region(s); it needs one per region", path)
    elif any(v not in values or v == 0 for v in order):
        problems.add(f"'regions_class_order' {order} must hold foreground label values from {values[1:]}", path)


def read_dataset_json(root: Path) -> dict:
    """dataset.json as a dict, with required keys and their types checked (first problem raised)."""
    meta = _check_dataset_json(Path(root), ProblemCollector(fail_fast=True))
    if meta is None:  # unreachable in fail-fast mode; kept so the type is dict
        raise DatasetError("unusable dataset.json", Path(root) / "dataset.json")
    return meta


COMPANION_DATA_ENDINGS = (".raw", ".zraw", ".raw.gz")
"""Data files that sit next to .mhd / .nhdr headers; not images of their own."""


MAX_STRAY_NAMES = 3
"""Ignored file names a warning lists before it gives only their count."""


def _is_stray(f: Path, ending: str) -> bool:
    """Not a case file: nnU-Net v2 lists only files ending in ``file_ending`` and ignores the rest.

    Hidden files (``.DS_Store``, macOS ``._*`` forks) and the data files next to .mhd/.nhdr
    headers are skipped without a word; anything else (``case_001.nii.gz.bak``, ``README.txt``)
    is stray and gets named in one warning.
    """
    return not f.name.startswith(".") and not f.name.endswith(ending) and not f.name.lower().endswith(
        COMPANION_DATA_ENDINGS)


def warn_stray_files(stray: list[Path], root: Path, ending: str) -> None:
    """One warning line naming a few ignored files (relative to ``root``) and how many there are."""
    if not stray:
        return
    names = [str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in stray]
    more = f" and {len(names) - MAX_STRAY_NAMES} more" if len(names) > MAX_STRAY_NAMES else ""
    log.warning("%s: ignoring %d file(s) not ending in %r (as nnU-Net does): %s%s", root, len(names), ending,
                ", ".join(names[:MAX_STRAY_NAMES]), more)


def _group_channels(folder: Path, ending: str, n_channels: int,
                    problems: ProblemCollector, stray: list[Path]) -> dict[str, list[Path | None]]:
    """Map case id -> channel files found in an images folder (None where a channel is missing).

    Files that are not case files are appended to ``stray`` (see `_is_stray`).
    """
    cases: dict[str, list[Path | None]] = {}
    if not folder.is_dir():
        return cases
    for f in sorted(folder.iterdir()):
        if not f.name.endswith(ending) or f.name.startswith("."):
            if _is_stray(f, ending):
                stray.append(f)
            continue
        stem = f.name[: -len(ending)]
        m = CHANNEL_SUFFIX_RE.match(stem)
        if not m:
            problems.add(f"image file name must end in _XXXX{ending} (channel index)", f)
            continue
        ch = int(m.group("channel"))
        if ch >= n_channels:
            problems.add(f"channel {ch} is not declared in channel_names ({n_channels} channel(s))", f)
            continue
        cases.setdefault(m.group("case"), [None] * n_channels)[ch] = f
    return cases


def _pair_cases(groups: dict[str, list[Path | None]], images_dir: Path, labels_dir: Path | None,
                ending: str, problems: ProblemCollector) -> tuple[CaseFiles, ...]:
    """One `CaseFiles` per complete case; incomplete cases are reported and left out."""
    out = []
    for case_id, files in sorted(groups.items()):
        missing = [i for i, f in enumerate(files) if f is None]
        if missing:
            problems.add(f"case {case_id!r} is missing channel file(s) "
                         + ", ".join(f"{case_id}_{i:04d}{ending}" for i in missing), images_dir)
            continue
        label = None
        if labels_dir is not None:
            label = labels_dir / f"{case_id}{ending}"
            if not label.exists():
                problems.add(f"case {case_id!r} has no label file", label)
                continue
        out.append(CaseFiles(case_id, tuple(f for f in files if f is not None), label))
    return tuple(out)


def _check_label_folder(labels_dir: Path, ending: str, known: set[str], problems: ProblemCollector,
                        stray: list[Path]) -> None:
    """Every label file (one ending in file_ending) has a matching case in imagesTr/; others go to ``stray``."""
    for f in sorted(labels_dir.iterdir()):
        if not f.name.endswith(ending) or f.name.startswith("."):
            if _is_stray(f, ending):
                stray.append(f)
        elif f.name[: -len(ending)] not in known:
            problems.add("label file has no matching image in imagesTr/", f)


def scan_dataset(root: str | Path, problems: ProblemCollector) -> DatasetSpec | None:
    """Read dataset.json and pair the files, reporting every structural problem to ``problems``.

    Returns the spec of the complete cases (None when dataset.json is unusable). Reads no
    image: `autoseg.dataset.verify` does that.
    """
    root = Path(root)
    if not root.is_dir():
        problems.add("raw dataset folder not found", root)
        return None
    meta = _check_dataset_json(root, problems)
    if meta is None:
        return None
    ending = meta["file_ending"]
    channel_names = {int(k): str(v) for k, v in sorted(meta["channel_names"].items(), key=lambda kv: int(kv[0]))}
    n_ch = len(channel_names)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        problems.add("missing imagesTr/ folder", images_dir)
    if not labels_dir.is_dir():
        problems.add("missing labelsTr/ folder", labels_dir)
    stray: list[Path] = []
    groups = _group_channels(images_dir, ending, n_ch, problems, stray)
    cases = _pair_cases(groups, images_dir, labels_dir, ending, problems)
    if images_dir.is_dir() and not groups:
        problems.add(f"no training cases (*_0000{ending}) in imagesTr/", images_dir)
    elif groups and isinstance(meta["numTraining"], int) and len(groups) != meta["numTraining"]:
        problems.add(f"numTraining is {meta['numTraining']} but imagesTr/ holds {len(groups)} case(s)",
                     root / "dataset.json")
    if labels_dir.is_dir():
        _check_label_folder(labels_dir, ending, set(groups), problems, stray)
    test_dir = root / "imagesTs"
    test_cases = _pair_cases(_group_channels(test_dir, ending, n_ch, problems, stray), test_dir, None, ending,
                             problems)
    warn_stray_files(stray, root, ending)
    labels = meta["labels"] if isinstance(meta["labels"], dict) else {}
    usable = {str(k): v for k, v in labels.items() if (isinstance(v, int) and not isinstance(v, bool)) or (
        k not in ("background", IGNORE_KEY) and isinstance(v, list) and v
        and all(isinstance(x, int) and not isinstance(x, bool) for x in v))}
    scheme = LabelScheme.from_labels(usable)
    order = meta.get("regions_class_order") if scheme.has_regions else None
    order = tuple(order) if isinstance(order, list) and all(isinstance(v, int) for v in order) else ()
    return DatasetSpec(name=root.name, root=root, channel_names=channel_names, labels=scheme.labels,
                       num_training=len(cases), file_ending=ending, cases=cases, test_cases=test_cases,
                       regions_class_order=order)


def load_dataset(root: str | Path) -> DatasetSpec:
    """Read a raw dataset folder; raise `DatasetError` at the first structural problem."""
    spec = scan_dataset(root, ProblemCollector(fail_fast=True))
    if spec is None:  # unreachable in fail-fast mode
        raise DatasetError("unusable raw dataset", root)
    return spec
