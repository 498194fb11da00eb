"""revert_preprocessing puts predictions back on the original grid, geometry included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoseg.common.jsonio import load_record, save_record
from autoseg.dataset.io import read_image, write_image
from autoseg.preprocess import CaseProperties, preprocess_case, revert_preprocessing
from tests.preprocess.conftest import blob_case, make_config, make_plan


def _one_hot(seg: np.ndarray, k: int) -> np.ndarray:
    return np.stack([(seg == c).astype(np.float32) for c in range(k)])


@pytest.mark.parametrize("transpose, spacing, target", [
    ((0, 1, 2), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),   # crop only
    ((0, 1, 2), (1.0, 0.9, 1.1), (0.8, 1.0, 1.0)),   # isotropic resampling
    ((0, 1, 2), (4.0, 0.8, 0.8), (2.0, 1.0, 1.0)),   # anisotropic: separate z
    ((2, 0, 1), (0.8, 0.8, 4.0), (4.0, 1.0, 1.0)),   # coarse x moved first by the transpose
])
def test_revert_of_preprocessed_labels_recovers_the_original(tmp_path: Path, transpose: tuple, spacing: tuple,
                                                             target: tuple) -> None:
    data, seg, geom = blob_case(shape=(9, 30, 26), spacing=spacing, pad=2)
    config = make_config("3d", target)
    plan = make_plan([config], transpose=transpose)
    _, out_seg, props, _ = preprocess_case(data, geom, seg, plan, config)
    reverted = revert_preprocessing(_one_hot(out_seg[0], 3), props, plan, config)
    assert reverted.shape == (3, *seg.shape)
    labels = reverted.argmax(0)
    outside = np.ones(seg.shape, bool)
    outside[tuple(slice(a, b) for a, b in props.bbox)] = False
    assert np.all(reverted[0][outside] == 1) and np.all(reverted[1:][:, outside] == 0)
    assert np.mean(labels == seg) > 0.97
    # the stored properties survive their JSON round trip and give back the exact geometry
    save_record(tmp_path / "case.json", props)
    loaded = load_record(tmp_path / "case.json", CaseProperties)
    assert loaded == props
    write_image(tmp_path / "pred.nii.gz", labels.astype(np.uint8), loaded.original_geometry)
    arr, written = read_image(tmp_path / "pred.nii.gz")
    assert np.array_equal(arr, labels)
    assert written.shape == geom.shape
    assert np.allclose(written.spacing, geom.spacing, rtol=0, atol=1e-6)
    assert np.allclose(written.origin, geom.origin, rtol=0, atol=1e-6)
    assert np.allclose(written.direction, geom.direction, rtol=0, atol=1e-12)


def test_revert_of_a_2d_configuration_stack(tmp_path: Path) -> None:
    data, seg, geom = blob_case(shape=(7, 30, 26), spacing=(3.0, 0.7, 0.7), pad=1)
    config = make_config("2d", (1.0, 1.0))
    plan = make_plan([config])
    _, out_seg, props, _ = preprocess_case(data, geom, seg, plan, config)
    assert props.separate_z_axis == 0 and out_seg.shape[1] == 5
    labels = revert_preprocessing(_one_hot(out_seg[0], 3), props, plan, config).argmax(0)
    assert labels.shape == seg.shape and np.mean(labels == seg) > 0.97


def test_revert_checks_the_shape() -> None:
    data, seg, geom = blob_case()
    config = make_config("3d", (1.0, 1.0, 1.0))
    plan = make_plan([config])
    _, _, props, _ = preprocess_case(data, geom, seg, plan, config)
    with pytest.raises(ValueError, match="expected"):
        revert_preprocessing(np.zeros((3, 2, 2, 2), np.float32), props, plan, config)
