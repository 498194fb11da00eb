"""preprocess_dataset on the phantom: files, completeness, skipping, settings guard, workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths
from autoseg.preprocess import (case_files, list_preprocessed_cases, load_preprocessed_case, median_preprocessed_shape,
                                preprocess_dataset)
from autoseg.splits import load_splits
from tests.preprocess.conftest import make_config, make_plan, own_roots

DS = "Dataset999_Phantom"


def _plan(spacing3d: tuple[float, float, float] = (3.0, 1.0, 1.0)):
    return make_plan([make_config("2d", spacing3d[1:]), make_config("3d_fullres", spacing3d)],
                     dataset=DS)


def test_writes_every_case_for_each_configuration(phantom_small: Paths, tmp_path: Path) -> None:
    paths = own_roots(phantom_small, tmp_path)
    folders = preprocess_dataset(paths, DS, ["2d", "3d_fullres"], plan=_plan())
    assert set(folders) == {"2d", "3d_fullres"}
    ids = [f"phantom_{i:03d}" for i in range(8)]
    for name, folder in folders.items():
        assert folder == paths.preprocessed_data(DS, name)
        assert list_preprocessed_cases(folder) == ids
        case = load_preprocessed_case(folder, ids[0])
        assert isinstance(case.data, np.memmap) and case.data.dtype == np.float32
        assert case.seg.dtype == np.int8 and case.seg.shape == (1, *case.data.shape[1:])
        assert case.data.shape[1:] == case.properties.shape_after_resampling
        assert case.properties.case_id == ids[0]
        assert set(case.fg_locations) == {1, 2}
        assert all(np.all(case.seg[0][tuple(v.T)] == k) for k, v in case.fg_locations.items())
        assert len(median_preprocessed_shape(folder)) == 3
    splits = load_splits(paths, DS)
    assert splits.n_folds == 5 and splits.case_ids == tuple(ids)


def test_done_cases_are_skipped_and_incomplete_ones_redone(phantom_small: Paths, tmp_path: Path) -> None:
    paths = own_roots(phantom_small, tmp_path)
    plan = _plan()
    folder = preprocess_dataset(paths, DS, ["3d_fullres"], plan=plan)["3d_fullres"]
    kept, broken = case_files(folder, "phantom_000"), case_files(folder, "phantom_001")
    past = 1_000_000_000
    for f in (*kept.values(), *broken.values()):
        os.utime(f, (past, past))
    broken["json"].unlink()  # as if the process died before the json was written
    (folder / ".phantom_002.npy.abc.tmp").write_bytes(b"partial")  # a killed writer's leftover
    assert "phantom_001" not in list_preprocessed_cases(folder)
    preprocess_dataset(paths, DS, ["3d_fullres"], plan=plan)
    assert kept["data"].stat().st_mtime == past
    assert broken["json"].exists() and broken["data"].stat().st_mtime > past
    assert len(list_preprocessed_cases(folder)) == 8
    preprocess_dataset(paths, DS, ["3d_fullres"], plan=plan, force=True)
    assert kept["data"].stat().st_mtime > past


def test_different_settings_in_the_same_folder_need_force(phantom_small: Paths, tmp_path: Path) -> None:
    paths = own_roots(phantom_small, tmp_path)
    preprocess_dataset(paths, DS, ["3d_fullres"], plan=_plan((3.0, 1.0, 1.0)))
    with pytest.raises(AutosegError, match="different settings"):
        preprocess_dataset(paths, DS, ["3d_fullres"], plan=_plan((3.0, 1.5, 1.5)))
    folder = preprocess_dataset(paths, DS, ["3d_fullres"], plan=_plan((3.0, 1.5, 1.5)), force=True)["3d_fullres"]
    case = load_preprocessed_case(folder, "phantom_000")
    assert case.properties.spacing_after_resampling == (3.0, 1.5, 1.5)


def test_missing_plan_and_unknown_configuration(phantom_small: Paths, tmp_path: Path) -> None:
    paths = own_roots(phantom_small, tmp_path)
    with pytest.raises(AutosegError, match="run `autoseg plan"):
        preprocess_dataset(paths, DS, ["3d_fullres"])
    with pytest.raises(AutosegError, match="not in the plan"):
        preprocess_dataset(paths, DS, ["3d_lowres"], plan=_plan())


def test_worker_processes_give_the_same_files(phantom_small: Paths, tmp_path: Path) -> None:
    one = own_roots(phantom_small, tmp_path / "one")
    two = own_roots(phantom_small, tmp_path / "two")
    a = preprocess_dataset(one, DS, ["3d_fullres"], num_workers=1, plan=_plan())["3d_fullres"]
    b = preprocess_dataset(two, DS, ["3d_fullres"], num_workers=2, plan=_plan())["3d_fullres"]
    for cid in list_preprocessed_cases(a):
        x, y = load_preprocessed_case(a, cid, mmap=False), load_preprocessed_case(b, cid, mmap=False)
        assert np.array_equal(x.data, y.data) and np.array_equal(x.seg, y.seg)
        assert all(np.array_equal(x.fg_locations[k], y.fg_locations[k]) for k in x.fg_locations)


def test_bad_user_splits_fail_before_any_preprocessing(phantom_small: Paths, tmp_path: Path) -> None:
    # a raw dataset made of links to the shared phantom, plus the user's own splits.json
    paths = Paths(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "res")
    (paths.raw / DS).mkdir(parents=True)
    for child in phantom_small.raw_dataset(DS).iterdir():
        (paths.raw / DS / child.name).symlink_to(child, target_is_directory=child.is_dir())
    (paths.raw / DS / "splits.json").write_text('[{"train": ["phantom_000", "ghost"], "val": ["phantom_001"]}]')
    with pytest.raises(AutosegError, match="ghost"):
        preprocess_dataset(paths, DS, ["3d_fullres"], plan=_plan())
    assert not paths.preprocessed_data(DS, "3d_fullres").exists()
