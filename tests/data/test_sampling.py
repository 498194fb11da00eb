"""Patch placement: foreground oversampling rule, padding of small cases, 2D slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoseg.common.errors import AutosegError
from autoseg.data.sampling import (
    CaseFiles,
    class_voxel_counts,
    crop_padded,
    is_forced_foreground,
    load_arrays,
    load_foreground,
    sample_patch,
)


@pytest.mark.parametrize("batch_size, forced", [(1, []), (2, [1]), (3, [2]), (12, [8, 9, 10, 11])])
def test_the_last_third_of_a_batch_is_forced(batch_size: int, forced: list[int]) -> None:
    assert [i for i in range(batch_size) if is_forced_foreground(i, batch_size, 0.33)] == forced


def test_crop_padded_fills_outside_the_case() -> None:
    arr = np.arange(1, 1 + 2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)
    out = crop_padded(arr, (-1, 1, -2), (4, 2, 5), fill=0.0)
    assert out.shape == (1, 4, 2, 5)
    np.testing.assert_array_equal(out[0, 1:3, 0:2, 2:5], arr[0, :, 1:3, 0:3])
    assert out.sum() == arr[0, :, 1:3, 0:3].sum()
    far = crop_padded(arr, (10, 10, 10), (2, 2, 2), fill=-7.0)
    assert (far == -7.0).all()


def test_a_case_smaller_than_the_patch_is_padded_and_kept_whole(preprocessed_cases: tuple[Path, tuple[str, ...]]) -> None:
    folder, _ = preprocessed_cases
    files = CaseFiles.of(folder, "tiny")
    data, seg = load_arrays(files)
    rng = np.random.default_rng(0)
    for forced in (False, True):
        d, s = sample_patch(rng, data, seg, load_foreground(files.foreground), (8, 16, 16), (8, 16, 16), forced)
        assert d.shape == (2, 8, 16, 16) and d.dtype == np.float32 and s.shape == (1, 8, 16, 16)
        # every voxel of the case is inside the patch exactly once; the rest is 0
        assert d.sum() == pytest.approx(float(np.asarray(data, dtype=np.float64).sum()), rel=1e-5)
        assert (s == 1).sum() == (seg == 1).sum()


def test_forced_patches_contain_foreground_in_2d_and_3d(preprocessed_cases: tuple[Path, tuple[str, ...]]) -> None:
    folder, ids = preprocessed_cases
    files = CaseFiles.of(folder, ids[0])
    data, seg = load_arrays(files)
    fg = load_foreground(files.foreground)
    assert sorted(fg) == [1, 2]
    rng = np.random.default_rng(1)
    for patch in ((8, 16, 16), (16, 24)):
        hits = [sample_patch(rng, data, seg, fg, patch, patch, True)[1].max() > 0 for _ in range(20)]
        assert all(hits)
        uniform = [sample_patch(rng, data, seg, fg, patch, patch, False)[1].max() > 0 for _ in range(40)]
        assert not all(uniform)


def test_2d_patches_are_slices_along_axis_0(preprocessed_cases: tuple[Path, tuple[str, ...]]) -> None:
    folder, ids = preprocessed_cases
    data, seg = load_arrays(CaseFiles.of(folder, ids[1]))
    d, s = sample_patch(np.random.default_rng(2), data, seg, {}, (48, 48), (48, 48), False)
    assert d.shape == (2, 48, 48) and s.shape == (1, 48, 48)
    matches = [z for z in range(data.shape[1]) if np.array_equal(d, data[:, z])]
    assert len(matches) == 1


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(AutosegError, match="preprocessed file missing") as e:
        CaseFiles.of(tmp_path, "nope").check()
    assert e.value.where == str(tmp_path / "nope.npy")


def test_class_voxel_counts_skip_ignore_and_fill_and_spread_over_cases(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(6)]
    for i, case in enumerate(ids):  # case i: i+1 voxels of class 1, 2 of class 2, one ignore (3), one -1
        seg = np.zeros((1, 4, 5, 6), dtype=np.int8)
        flat = seg.reshape(-1)
        flat[:i + 1] = 1
        flat[10:12] = 2
        flat[20], flat[21] = 3, -1
        np.save(tmp_path / f"{case}_seg.npy", seg)
    every = class_voxel_counts(tmp_path, ids, num_classes=3)
    assert every.tolist() == [6 * 120 - 21 - 12 - 12, 21, 12]
    picked = class_voxel_counts(tmp_path, ids, num_classes=3, max_cases=2)  # first and last case
    assert picked.tolist() == [2 * 120 - 7 - 4 - 4, 1 + 6, 4]
    with pytest.raises(AutosegError, match="preprocessed file missing"):
        class_voxel_counts(tmp_path, ["c0", "nope"], num_classes=3)
