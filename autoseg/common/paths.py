"""Where raw data, preprocessed data and results live, and how datasets are named.

One `Paths` is built once (in the CLI, from the environment and options) and passed
explicitly to every function that touches the disk; no other module reads the environment
(except the scheduler, which builds child environments). Folder layout:

    raw/DatasetXXX_Name/{dataset.json, imagesTr/, labelsTr/, imagesTs/}
    preprocessed/DatasetXXX_Name/{fingerprint.json, plans.json, plans_<preset>.json, splits.json,
                                  <data_identifier>/}
    results/DatasetXXX_Name/[<preset>__]<config>/<variant>/[seed_<s>/]fold_<k>/
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from autoseg.common.errors import AutosegError

ENV_VARS: dict[str, tuple[str, str]] = {
    "raw": ("AUTOSEG_RAW", "nnUNet_raw"),
    "preprocessed": ("AUTOSEG_PREPROCESSED", "nnUNet_preprocessed"),
    "results": ("AUTOSEG_RESULTS", "nnUNet_results"),
}
"""Our variable first; nnU-Net's is accepted when ours is unset, so an nnU-Net user's shell works as is."""

DEFAULT_ROOT = Path("datasets")
"""Without variables or options, everything lives in ./datasets/{raw,preprocessed,results}."""

DEFAULT_PLANS = "default"
"""The plans of the default planner (plans.json); other names are planner presets (plans_<name>.json)."""

DATASET_NAME_RE = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9][A-Za-z0-9_\-]*)$")
"""nnU-Net v2 naming: three-digit id, underscore, a name."""


FOLDER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")
"""The one rule for a name that becomes a folder (variant, configuration, sweep, model member):
starts with a letter or digit, then letters, digits, ``.``, ``_``, ``-``; so never ``..``, ``/`` or empty."""


def is_folder_name(text: str) -> bool:
    """Whether ``text`` may be used as one path component under a results root (`FOLDER_NAME_RE`)."""
    return FOLDER_NAME_RE.fullmatch(text) is not None


def dataset_name(dataset_id: int, name: str) -> str:
    """``dataset_name(4, "Hippocampus") -> "Dataset004_Hippocampus"``."""
    if not 0 < dataset_id < 1000:
        raise AutosegError(f"dataset id must be between 1 and 999, got {dataset_id}")
    full = f"Dataset{dataset_id:03d}_{name}"
    if not DATASET_NAME_RE.match(full):
        raise AutosegError(f"invalid dataset name {full!r} (letters, digits, '_' and '-' only)")
    return full


PLANS_SEPARATOR = "__"
"""Between the preset and the configuration in a results folder name (nnU-Net's ``Plans__Config``)."""


def split_config_dirname(name: str) -> tuple[str, str]:
    """``"resenc-l__3d_fullres"`` -> ``("resenc-l", "3d_fullres")``; ``"3d_fullres"`` -> ``("default", "3d_fullres")``."""
    plans, sep, config = name.rpartition(PLANS_SEPARATOR)
    return (plans, config) if sep and plans and config else (DEFAULT_PLANS, name)


@dataclass(frozen=True)
class TrainingId:
    """One training run: which dataset, configuration, fold, ablation variant and seed.

    ``fold`` is an int 0..k-1 or the string ``"all"`` (train on every case). ``seed`` is None
    for an ordinary run (the TrainerConfig seed applies, no seed folder); sweeps set it.
    ``plans`` names the planner preset whose plans file the run trains with; a preset's runs
    live in ``<preset>__<config>`` (nnU-Net's ``Trainer__Plans__Config``) so they never clobber
    the default plan's. That folder name is accepted as ``config`` too (find-best discovers it,
    ``predict -c resenc-l__3d_fullres`` ensembles across presets): it is split into the two.
    """

    dataset: str
    config: str
    fold: int | str
    variant: str = "default"
    seed: int | None = None
    plans: str = DEFAULT_PLANS

    def __post_init__(self) -> None:
        plans, config = split_config_dirname(self.config)
        if plans != DEFAULT_PLANS:
            if self.plans not in (DEFAULT_PLANS, plans):
                raise AutosegError(f"configuration {self.config!r} names plans {plans!r}, but {self.plans!r} "
                                   "were asked for", where="--plans")
            object.__setattr__(self, "config", config)
            object.__setattr__(self, "plans", plans)

    @property
    def fold_dirname(self) -> str:
        return f"fold_{self.fold}"

    @property
    def config_dirname(self) -> str:
        """``3d_fullres`` for the default plans, ``resenc-l__3d_fullres`` for a preset's."""
        return self.config if self.plans == DEFAULT_PLANS else f"{self.plans}{PLANS_SEPARATOR}{self.config}"

    def relative_dir(self) -> Path:
        parts = [self.dataset, self.config_dirname, self.variant]
        if self.seed is not None:
            parts.append(f"seed_{self.seed}")
        return Path(*parts, self.fold_dirname)

    def __str__(self) -> str:
        seed = f"/seed_{self.seed}" if self.seed is not None else ""
        return f"{self.dataset}/{self.config_dirname}/{self.variant}{seed}/fold_{self.fold}"


@dataclass(frozen=True)
class Paths:
    """The three roots. Build with `Paths.from_env`; pass it explicitly everywhere."""

    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str], overrides: Mapping[str, str | Path | None] | None = None,
                 base: Path | None = None) -> "Paths":
        """CLI option > AUTOSEG_* > nnUNet_* > ``<base or cwd>/datasets/<kind>``."""
        overrides = overrides or {}
        base = Path.cwd() if base is None else Path(base)
        roots: dict[str, Path] = {}
        for kind, (ours, theirs) in ENV_VARS.items():
            value = overrides.get(kind) or env.get(ours) or env.get(theirs)
            roots[kind] = Path(value).expanduser() if value else base / DEFAULT_ROOT / kind
            if not roots[kind].is_absolute():
                roots[kind] = (base / roots[kind]).resolve()
        return cls(**roots)

    @classmethod
    def under(cls, root: Path) -> "Paths":
        """All three roots below one folder (tests, the demo)."""
        root = Path(root)
        return cls(root / "raw", root / "preprocessed", root / "results")

    def as_env(self) -> dict[str, str]:
        """The variables that reproduce these paths in a child process."""
        return {"AUTOSEG_RAW": str(self.raw), "AUTOSEG_PREPROCESSED": str(self.preprocessed),
                "AUTOSEG_RESULTS": str(self.results)}

    # ------------------------------------------------------------------ dataset names
    def resolve_dataset(self, name_or_id: str | int) -> str:
        """Turn ``4``, ``"004"``, ``"Dataset004"`` or ``"Dataset004_Hippocampus"`` into the full name.

        Looks in raw/ first, then preprocessed/ (a user may have only preprocessed data).
        """
        text = str(name_or_id).strip()
        if DATASET_NAME_RE.match(text):
            return text
        m = re.fullmatch(r"(?:Dataset)?(\d{1,3})", text)
        if not m:
            raise AutosegError(
                f"cannot understand dataset {text!r}: give DatasetXXX_Name, an id like 4 or 004")
        wanted = int(m.group(1))
        found: set[str] = set()
        for root in (self.raw, self.preprocessed, self.results):
            if root.is_dir():
                for child in root.iterdir():
                    mm = DATASET_NAME_RE.match(child.name)
                    if mm and int(mm.group(1)) == wanted and child.is_dir():
                        found.add(child.name)
        if not found:
            raise AutosegError(f"no dataset with id {wanted:03d} under {self.raw} (or preprocessed/results)")
        if len(found) > 1:
            raise AutosegError(f"dataset id {wanted:03d} is ambiguous: {sorted(found)}")
        return found.pop()

    def list_raw_datasets(self) -> list[str]:
        """Every DatasetXXX_Name folder in the raw root, sorted."""
        if not self.raw.is_dir():
            return []
        return sorted(c.name for c in self.raw.iterdir() if c.is_dir() and DATASET_NAME_RE.match(c.name))

    # ------------------------------------------------------------------ folders
    def raw_dataset(self, dataset: str) -> Path:
        return self.raw / dataset

    def preprocessed_dataset(self, dataset: str) -> Path:
        return self.preprocessed / dataset

    def fingerprint_file(self, dataset: str) -> Path:
        return self.preprocessed / dataset / "fingerprint.json"

    def plans_file(self, dataset: str, preset: str = DEFAULT_PLANS) -> Path:
        """``plans.json``, or ``plans_<preset>.json`` beside it for a planner preset."""
        name = "plans.json" if preset == DEFAULT_PLANS else f"plans_{preset}.json"
        return self.preprocessed / dataset / name

    def splits_file(self, dataset: str) -> Path:
        return self.preprocessed / dataset / "splits.json"

    def preprocessed_data(self, dataset: str, data_identifier: str) -> Path:
        """Folder of preprocessed cases for one configuration's data identifier."""
        return self.preprocessed / dataset / data_identifier

    def results_dataset(self, dataset: str) -> Path:
        return self.results / dataset

    def training_dir(self, tid: TrainingId) -> Path:
        """results/<dataset>/<config>/<variant>/[seed_<s>/]fold_<k>/ — a training writes only here."""
        return self.results / tid.relative_dir()

    def scheduler_dir(self) -> Path:
        """results/.autoseg/ holds the scheduler's state database, lock and job records."""
        return self.results / ".autoseg"
