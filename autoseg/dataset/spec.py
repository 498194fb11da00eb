"""The in-memory description of a raw dataset in nnU-Net v2 layout.

    DatasetXXX_Name/
      dataset.json      {"channel_names": {"0": "CT"}, "labels": {"background": 0, ...},
                         "numTraining": N, "file_ending": ".nii.gz"}
      imagesTr/CASE_0000.nii.gz  (one file per channel: _0000, _0001, ...)
      labelsTr/CASE.nii.gz
      imagesTs/          (optional)

`load_dataset` reads dataset.json and pairs the files; it raises on the first structural
problem. `autoseg.dataset.verify` goes further (reads every image) and reports every problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from autoseg.common.errors import DatasetError
from autoseg.common.jsonio import read_json
from autoseg.common.paths import DATASET_NAME_RE
from autoseg.dataset.io import SUPPORTED_ENDINGS

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
"""dataset.json keys nnU-Net v2 requires; we require the same ones."""

CHANNEL_SUFFIX_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


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
    labels: dict[str, int]
    num_training: int
    file_ending: str
    cases: tuple[CaseFiles, ...]
    test_cases: tuple[CaseFiles, ...] = ()

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def foreground_labels(self) -> tuple[int, ...]:
        """Label values other than background (0), sorted."""
        return tuple(sorted(v for v in self.labels.values() if v != 0))

    @property
    def num_classes(self) -> int:
        """Number of network output channels (background included)."""
        return len(self.labels)

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    def case(self, case_id: str) -> CaseFiles:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise DatasetError(f"no training case {case_id!r}", self.root)


def read_dataset_json(root: Path) -> dict:
    """dataset.json as a dict, with required keys and their types checked."""
    path = Path(root) / "dataset.json"
    if not path.exists():
        raise DatasetError("missing dataset.json", path)
    try:
        meta = read_json(path)
    except Exception as e:  # AutosegError from read_json: re-raise as a dataset error
        raise DatasetError(getattr(e, "message", str(e)), path) from None
    if not isinstance(meta, dict):
        raise DatasetError("dataset.json must hold a JSON object", path)
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DatasetError(f"missing required key(s) {', '.join(missing)}", path)
    if not isinstance(meta["channel_names"], dict) or not meta["channel_names"]:
        raise DatasetError("'channel_names' must be a non-empty object like {\"0\": \"CT\"}", path)
    if not all(str(k).isdigit() for k in meta["channel_names"]):
        raise DatasetError("'channel_names' keys must be channel indices \"0\", \"1\", ...", path)
    if not isinstance(meta["labels"], dict) or "background" not in meta["labels"]:
        raise DatasetError("'labels' must be an object that includes \"background\": 0", path)
    for name, value in meta["labels"].items():
        if isinstance(value, (list, tuple)):
            raise DatasetError(f"label {name!r} is a region (list of labels); region-based training "
                               "is not supported yet", path)
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(f"label {name!r} must map to an integer, got {value!r}", path)
    if not isinstance(meta["numTraining"], int) or isinstance(meta["numTraining"], bool):
        raise DatasetError("'numTraining' must be an integer", path)
    ending = meta["file_ending"]
    if not isinstance(ending, str) or ending.lower() not in SUPPORTED_ENDINGS:
        raise DatasetError(f"unsupported file_ending {ending!r} (supported: {', '.join(SUPPORTED_ENDINGS)})", path)
    return meta


def _group_channels(folder: Path, ending: str, n_channels: int) -> dict[str, list[Path | None]]:
    """Map case id -> channel files found in an images folder (None where a channel is missing)."""
    cases: dict[str, list[Path | None]] = {}
    if not folder.is_dir():
        return cases
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ending):
            continue
        stem = f.name[: -len(ending)]
        m = CHANNEL_SUFFIX_RE.match(stem)
        if not m:
            raise DatasetError(f"image file name must end in _XXXX{ending} (channel index)", f)
        ch = int(m.group("channel"))
        if ch >= n_channels:
            raise DatasetError(f"channel {ch} is not declared in channel_names ({n_channels} channel(s))", f)
        cases.setdefault(m.group("case"), [None] * n_channels)[ch] = f
    return cases


def load_dataset(root: str | Path) -> DatasetSpec:
    """Read a raw dataset folder; raise `DatasetError` at the first structural problem."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("raw dataset folder not found", root)
    meta = read_dataset_json(root)
    ending = meta["file_ending"]
    channel_names = {int(k): str(v) for k, v in sorted(meta["channel_names"].items(), key=lambda kv: int(kv[0]))}
    n_ch = len(channel_names)

    def pair(images_dir: Path, labels_dir: Path | None) -> tuple[CaseFiles, ...]:
        out = []
        for case_id, files in sorted(_group_channels(images_dir, ending, n_ch).items()):
            missing = [i for i, f in enumerate(files) if f is None]
            if missing:
                raise DatasetError(f"case {case_id!r} is missing channel file(s) "
                                   + ", ".join(f"{case_id}_{i:04d}{ending}" for i in missing), images_dir)
            label = None
            if labels_dir is not None:
                label = labels_dir / f"{case_id}{ending}"
                if not label.exists():
                    raise DatasetError(f"case {case_id!r} has no label file", label)
            out.append(CaseFiles(case_id, tuple(f for f in files if f is not None), label))
        return tuple(out)

    cases = pair(root / "imagesTr", root / "labelsTr")
    if not cases:
        raise DatasetError(f"no training cases (*_0000{ending}) in imagesTr/", root / "imagesTr")
    if len(cases) != meta["numTraining"]:
        raise DatasetError(f"numTraining is {meta['numTraining']} but imagesTr/ holds {len(cases)} case(s)",
                           root / "dataset.json")
    labels_dir = root / "labelsTr"
    if labels_dir.is_dir():
        known = {c.case_id for c in cases}
        for f in sorted(labels_dir.iterdir()):
            if f.name.endswith(ending) and f.name[: -len(ending)] not in known:
                raise DatasetError("label file has no matching image in imagesTr/", f)
    name = root.name if DATASET_NAME_RE.match(root.name) else root.name
    return DatasetSpec(name=name, root=root, channel_names=channel_names,
                       labels={str(k): int(v) for k, v in meta["labels"].items()},
                       num_training=int(meta["numTraining"]), file_ending=ending, cases=cases,
                       test_cases=pair(root / "imagesTs", None))
