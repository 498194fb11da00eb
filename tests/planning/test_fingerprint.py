"""Fingerprint extraction: crop-to-nonzero, label counts, seeded sampling, caching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.common.errors import DatasetError
from autoseg.common.jsonio import save_record
from autoseg.common.paths import Paths
from autoseg.dataset.io import Geometry, read_image, write_image
from autoseg.dataset.spec import load_dataset
from autoseg.fingerprint import Fingerprint, extract_fingerprint, load_or_extract_fingerprint, nonzero_bbox


def test_nonzero_bbox_uses_any_channel_and_fills_holes() -> None:
    image = np.zeros((2, 6, 8, 8), dtype=np.float32)
    image[0, 1:5, 2:6, 2:6] = 1.0
    image[0, 2:4, 3:5, 3:5] = 0.0  # a hole inside the body stays inside the mask
    image[1, 5, 7, 7] = 3.0  # a second channel widens the box
    assert nonzero_bbox(image) == (slice(1, 6), slice(2, 8), slice(2, 8))
    assert nonzero_bbox(np.zeros((1, 3, 4, 5))) == (slice(0, 3), slice(0, 4), slice(0, 5))


def _tiny_dataset(root, with_foreground: bool = True) -> None:
    """Two cases of 6x10x10 with a zero border of 2 voxels in-plane, one channel, labels 0/1/2."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    geom = Geometry(shape=(6, 10, 10), spacing=(3.0, 0.5, 0.5), origin=(0.0, 0.0, 0.0),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    for i in range(2):
        img = np.zeros((6, 10, 10), dtype=np.float32)
        img[:, 2:8, 2:8] = 10.0 + i
        lab = np.zeros((6, 10, 10), dtype=np.uint8)
        if with_foreground:
            lab[1:3, 3:5, 3:5] = 1
            lab[3:5, 4:7, 4:7] = 2
            img[lab > 0] = 100.0 + i
        write_image(root / "imagesTr" / f"c{i}_0000.nii.gz", img, geom)
        write_image(root / "labelsTr" / f"c{i}.nii.gz", lab, geom)
    meta = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2,
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))


def test_extract_fingerprint_on_a_tiny_dataset(tmp_path) -> None:
    _tiny_dataset(tmp_path / "Dataset010_Tiny")
    fp = extract_fingerprint(load_dataset(tmp_path / "Dataset010_Tiny"), progress_bar=False)
    case = fp.cases[0]
    assert case.spacing == (3.0, 0.5, 0.5)
    assert case.shape_before_crop == (6, 10, 10) and case.shape_after_crop == (6, 6, 6)
    assert case.relative_size_after_crop == pytest.approx(36 / 100)
    assert case.class_voxels == {0: 600 - 8 - 18, 1: 8, 2: 18}
    stats = fp.foreground_intensity[0]
    assert (stats.min, stats.max) == (100.0, 101.0)
    assert stats.mean == pytest.approx(100.5)
    assert fp.median_relative_size_after_crop == pytest.approx(0.36)
    assert fp.channel_names == {0: "T1"} and fp.labels["b"] == 2


def test_fingerprint_is_seeded_and_independent_of_workers(phantom_small: Paths) -> None:
    spec = load_dataset(phantom_small.raw / "Dataset999_Phantom")
    one = extract_fingerprint(spec, num_workers=1, progress_bar=False)
    again = extract_fingerprint(spec, num_workers=1, progress_bar=False)
    other_seed = extract_fingerprint(spec, num_workers=1, seed=7, progress_bar=False)
    assert one == again
    assert [c.case_id for c in one.cases] == [c.case_id for c in spec.cases]
    assert one.cases == other_seed.cases
    # sampled statistics move a little with the seed, but stay close
    assert one.foreground_intensity[0].mean == pytest.approx(other_seed.foreground_intensity[0].mean, rel=0.05)
    for case, files in zip(one.cases, spec.cases):
        label, _ = read_image(files.label)
        assert sum(case.class_voxels.values()) == label.size


def test_no_foreground_is_a_dataset_error(tmp_path) -> None:
    _tiny_dataset(tmp_path / "Dataset011_Empty", with_foreground=False)
    with pytest.raises(DatasetError, match="no foreground"):
        extract_fingerprint(load_dataset(tmp_path / "Dataset011_Empty"), progress_bar=False)


def test_fingerprint_is_cached_until_forced_or_stale(paths: Paths) -> None:
    _tiny_dataset(paths.raw / "Dataset010_Tiny")
    first = load_or_extract_fingerprint(paths, "Dataset010_Tiny", progress_bar=False)
    file = paths.fingerprint_file("Dataset010_Tiny")
    assert json.loads(file.read_text(encoding="utf-8"))["schema"] == "autoseg.fingerprint"
    stamp = file.stat().st_mtime_ns
    assert load_or_extract_fingerprint(paths, "Dataset010_Tiny", progress_bar=False) == first
    assert file.stat().st_mtime_ns == stamp
    forced = load_or_extract_fingerprint(paths, "Dataset010_Tiny", force=True, progress_bar=False)
    assert forced == first and file.stat().st_mtime_ns != stamp
    # a fingerprint of other cases is stale: extracted again
    stale = Fingerprint(first.dataset, first.channel_names, first.labels, first.cases[:1], first.foreground_intensity)
    save_record(file, stale)
    spec = load_dataset(paths.raw / "Dataset010_Tiny")
    assert load_or_extract_fingerprint(paths, "Dataset010_Tiny", spec=spec, progress_bar=False) == first
