"""Splits: deterministic nnU-Net-style folds, user splits win, never rewritten, fold 'all'."""

from __future__ import annotations

import json

import pytest

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record, save_record
from autoseg.common.paths import Paths
from autoseg.splits import Fold, Splits, ensure_splits, fold_cases, load_splits, make_splits

IDS = [f"case_{i:02d}" for i in range(13)]


def test_make_splits_is_a_deterministic_partition() -> None:
    s = make_splits(list(reversed(IDS)))
    assert s == make_splits(IDS) and s.seed == 12345 and s.n_folds == 5
    vals = [set(f.val) for f in s.folds]
    assert sorted(len(v) for v in vals) == [2, 2, 3, 3, 3]
    assert set().union(*vals) == set(IDS) and sum(len(v) for v in vals) == len(IDS)
    for f in s.folds:
        assert set(f.train) == set(IDS) - set(f.val) and list(f.train) == sorted(f.train)
    assert make_splits(IDS, seed=1) != s


def test_few_cases() -> None:
    assert make_splits(["a", "b", "c"]).n_folds == 3
    one = make_splits(["a"])
    assert one.folds == (Fold(train=("a",), val=("a",)),)
    with pytest.raises(AutosegError):
        make_splits(["a", "a", "b"])


def test_fold_cases_and_fold_all() -> None:
    s = make_splits(IDS)
    train, val = fold_cases(s, 2)
    assert (train, val) == (list(s.folds[2].train), list(s.folds[2].val))
    assert fold_cases(s, "2") == (train, val)
    train_all, val_all = fold_cases(s, "all")
    assert train_all == val_all == sorted(IDS)
    for bad in (5, -1, "x"):
        with pytest.raises(AutosegError, match="fold"):
            fold_cases(s, bad)


def test_ensure_splits_writes_once_and_never_rewrites(paths: Paths) -> None:
    ds = "Dataset001_X"
    with pytest.raises(AutosegError, match="run `autoseg preprocess"):
        load_splits(paths, ds)
    first = ensure_splits(paths, ds, IDS)
    assert paths.splits_file(ds).exists() and load_splits(paths, ds) == first
    # an existing file wins, even when it is not what make_splits would give today
    custom = Splits(folds=(Fold(tuple(IDS[:10]), tuple(IDS[10:])),), seed=7)
    save_record(paths.splits_file(ds), custom)
    assert ensure_splits(paths, ds, IDS) == custom


def test_user_splits_in_nnunet_format_win(paths: Paths) -> None:
    ds = "Dataset001_X"
    user = paths.raw_dataset(ds) / "splits.json"
    user.parent.mkdir(parents=True)
    user.write_text(json.dumps([{"train": IDS[:8], "val": IDS[8:]}, {"train": IDS[5:], "val": IDS[:5]}]))
    s = ensure_splits(paths, ds, IDS)
    assert s.seed is None and s.n_folds == 2 and s.folds[0].val == tuple(IDS[8:])
    assert load_splits(paths, ds) == s
    # mirrored, so that "preprocessed splits.json exists" means "splits ready" for every reader
    assert load_record(paths.splits_file(ds), Splits) == s
    user.write_text(json.dumps([{"train": ["nope"], "val": IDS}]))
    with pytest.raises(AutosegError, match="nope") as err:
        ensure_splits(paths, ds, IDS)
    assert err.value.where == str(user)
    user.write_text(json.dumps({"folds": []}))
    with pytest.raises(AutosegError):
        ensure_splits(paths, ds, IDS)


def test_nnunet_splits_copied_into_preprocessed_are_read(paths: Paths) -> None:
    ds = "Dataset001_X"
    paths.splits_file(ds).parent.mkdir(parents=True)
    paths.splits_file(ds).write_text(json.dumps([{"train": IDS[1:], "val": IDS[:1]}]))
    assert load_splits(paths, ds).folds == (Fold(tuple(IDS[1:]), tuple(IDS[:1])),)
