"""Cross-validation splits: which cases each fold trains and validates on.

Splits are made once, by `autoseg preprocess`, before any training reads them, so folds that
train in parallel never race to create them (nnU-Net made them lazily in the trainer, and
parallel folds could each write their own). The rule is nnU-Net's: case ids sorted, then
scikit-learn's ``KFold(n_splits=5, shuffle=True, random_state=12345)``, reproduced here with
NumPy's legacy ``RandomState`` so the same ids give the same folds as nnU-Net without
depending on scikit-learn.

Where splits come from, first match wins:

1. ``raw/<dataset>/splits.json`` written by the user, in nnU-Net's format
   (a JSON list of ``{"train": [...], "val": [...]}``), mirrored into the preprocessed folder;
2. ``preprocessed/<dataset>/splits.json`` (our `Splits` record, or nnU-Net's list format
   for a user who copied ``splits_final.json`` there); written once and never rewritten.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import read_json, record_from_dict, save_record
from autoseg.common.paths import Paths

log = logging.getLogger(__name__)

DEFAULT_N_FOLDS = 5
"""nnU-Net trains 5-fold cross-validation by default."""

DEFAULT_SEED = 12345
"""nnU-Net's KFold random_state; the same sorted ids give the same folds."""

ALL_FOLD = "all"
"""The fold name that trains on every case (and validates on every case, like nnU-Net)."""

USER_SPLITS_FILENAME = "splits.json"
"""Name of the user-provided splits file in the raw dataset folder."""


@dataclass(frozen=True)
class Fold:
    """The training and validation case ids of one fold (each sorted)."""

    train: tuple[str, ...]
    val: tuple[str, ...]


@dataclass(frozen=True)
class Splits:
    """All folds of a dataset, persisted as ``preprocessed/<dataset>/splits.json``."""

    SCHEMA: ClassVar[str] = "autoseg.splits"
    VERSION: ClassVar[int] = 1

    folds: tuple[Fold, ...]
    seed: int | None
    """The shuffling seed; None when the folds came from a user's file."""

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    @property
    def case_ids(self) -> tuple[str, ...]:
        """Every case named by any fold, sorted."""
        return tuple(sorted({c for f in self.folds for c in (*f.train, *f.val)}))


def make_splits(case_ids: Sequence[str], n_folds: int = DEFAULT_N_FOLDS, seed: int = DEFAULT_SEED) -> Splits:
    """K folds over the sorted ids, shuffled with ``seed`` (same folds as nnU-Net's KFold).

    With fewer cases than folds, there is one fold per case (leave-one-out); a single case
    gives one fold that trains and validates on it (like fold ``all``).
    """
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise AutosegError("case ids are not unique")
    if n_folds < 2:
        raise AutosegError(f"n_folds must be at least 2, got {n_folds}")
    n = len(ids)
    k = min(n_folds, n)
    if n == 0:
        raise AutosegError("cannot make splits without cases")
    if k < 2:
        log.warning("only one case: fold 0 trains and validates on it")
        return Splits(folds=(Fold(train=tuple(ids), val=tuple(ids)),), seed=seed)
    if k < n_folds:
        log.warning("only %d cases: making %d folds instead of %d", n, k, n_folds)
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)  # exactly what scikit-learn's KFold(shuffle=True) does
    sizes = np.full(k, n // k, dtype=int)
    sizes[: n % k] += 1
    folds, start = [], 0
    for size in sizes:
        val_idx = set(order[start:start + size].tolist())
        start += size
        folds.append(Fold(train=tuple(ids[i] for i in range(n) if i not in val_idx),
                          val=tuple(ids[i] for i in range(n) if i in val_idx)))
    return Splits(folds=tuple(folds), seed=seed)


def user_splits_file(paths: Paths, dataset: str) -> Path:
    """``raw/<dataset>/splits.json``: the user's own folds (nnU-Net format), which always win."""
    return paths.raw_dataset(dataset) / USER_SPLITS_FILENAME


def _parse_splits(data: Any, where: Path) -> Splits:
    """Our record, or nnU-Net's list of ``{"train": [...], "val": [...]}``."""
    if isinstance(data, dict):
        return record_from_dict(Splits, data, where=str(where))
    if not isinstance(data, list):
        raise AutosegError("expected a list of {\"train\": [...], \"val\": [...]} objects", where)
    folds = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or set(entry) != {"train", "val"}:
            raise AutosegError(f"fold {i} must be an object with exactly the keys 'train' and 'val'", where)
        for key in ("train", "val"):
            if not isinstance(entry[key], list) or not all(isinstance(c, str) for c in entry[key]):
                raise AutosegError(f"fold {i}: '{key}' must be a list of case ids", where)
        if not entry["train"]:
            raise AutosegError(f"fold {i} has no training cases", where)
        folds.append(Fold(train=tuple(sorted(entry["train"])), val=tuple(sorted(entry["val"]))))
    return Splits(folds=tuple(folds), seed=None)


def _check_cases(splits: Splits, case_ids: Sequence[str], where: Path) -> None:
    unknown = sorted(set(splits.case_ids) - set(case_ids))
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise AutosegError(f"splits name case(s) not in the dataset: {', '.join(unknown[:5])}{more}", where)
    unused = set(case_ids) - set(splits.case_ids)
    if unused:
        log.warning("%s: %d case(s) of the dataset are in no fold", where, len(unused))


def ensure_splits(paths: Paths, dataset: str, case_ids: Sequence[str]) -> Splits:
    """The dataset's splits, creating ``preprocessed/<dataset>/splits.json`` if nothing exists yet.

    A user's ``raw/<dataset>/splits.json`` wins (and is mirrored into the preprocessed
    folder, so that file's existence means "splits ready"); otherwise an existing
    preprocessed splits file is never rewritten (delete it to regenerate). Both are checked
    against ``case_ids``: a fold naming an unknown case is an error now, not in a training.
    """
    user = user_splits_file(paths, dataset)
    target = paths.splits_file(dataset)
    if user.exists():
        splits = _parse_splits(read_json(user), user)
        _check_cases(splits, case_ids, user)
        # mirror it, so that "preprocessed/<ds>/splits.json exists" means "splits are ready" for
        # every reader (the scheduler checks that file); the user's file still wins on reading
        mirrored = _parse_splits(read_json(target), target) if target.exists() else None
        if mirrored != splits:
            save_record(target, splits)
            log.info("copied the user's %s to %s", user, target)
        return splits
    if target.exists():
        splits = _parse_splits(read_json(target), target)
        _check_cases(splits, case_ids, target)
        return splits
    splits = make_splits(case_ids)
    save_record(target, splits)
    log.info("wrote %s (%d folds over %d cases)", target, splits.n_folds, len(case_ids))
    return splits


def load_splits(paths: Paths, dataset: str) -> Splits:
    """The splits training uses (the user's raw file first); an error if preprocessing never made them."""
    for path in (user_splits_file(paths, dataset), paths.splits_file(dataset)):
        if path.exists():
            return _parse_splits(read_json(path), path)
    raise AutosegError(f"no splits for {dataset}; run `autoseg preprocess {dataset}` first",
                       paths.splits_file(dataset))


def fold_cases(splits: Splits, fold: int | str) -> tuple[list[str], list[str]]:
    """(train ids, val ids) of ``fold``: an index, its string form, or ``"all"`` (every case, twice)."""
    if isinstance(fold, str) and fold.strip().lower() == ALL_FOLD:
        every = list(splits.case_ids)
        return every, list(every)
    try:
        index = int(fold)
    except (TypeError, ValueError):
        raise AutosegError(f"fold must be a number or '{ALL_FOLD}', got {fold!r}", "fold") from None
    if isinstance(fold, bool) or not 0 <= index < splits.n_folds:
        raise AutosegError(f"fold {fold!r} does not exist: the splits have folds 0..{splits.n_folds - 1} "
                           f"and '{ALL_FOLD}'", "fold")
    f = splits.folds[index]
    return list(f.train), list(f.val)
