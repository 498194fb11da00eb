"""The data pipeline carries the ignore label: augmentation, deep-supervision targets, loader batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoseg.data.augment import AugmentConfig, AugParams, augmentation_setup
from autoseg.data.augment_cpu import apply_augmentation, downsample_seg_for_ds
from autoseg.data.loader import LoaderSpec, make_train_loader
from tests.data.conftest import CASE_SHAPE, CONFIG_2D, CONFIG_3D, write_case

IGNORE = 3


def _sparse_sample(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Two channels; classes 1 and 2 in boxes, the ignore label over the first half of the last axis."""
    data = np.random.default_rng(0).normal(size=(2,) + shape).astype(np.float32)
    seg = np.zeros((1,) + shape, dtype=np.int8)
    seg[(0,) + tuple(slice(s // 4, s // 2) for s in shape)] = 1
    seg[(0,) + tuple(slice(s // 2, 3 * s // 4) for s in shape)] = 2
    seg[..., : shape[-1] // 2] = IGNORE
    return data, seg


@pytest.mark.parametrize("config", [CONFIG_3D, CONFIG_2D], ids=["3d", "2d"])
def test_rotation_and_scaling_keep_ignore_and_invent_no_label(config) -> None:
    setup = augmentation_setup(config, AugmentConfig())
    data, seg = _sparse_sample(setup.initial_patch_size)
    angles = (0.4,) * len(setup.rotation_max_rad)
    _, out = apply_augmentation(data, seg, AugParams(rotation_rad=angles, scale=0.8, mirror_axes=(0,)), setup)
    assert out.shape == (1, *config.patch_size)
    assert set(np.unique(out).tolist()) <= {0, 1, 2, IGNORE}
    # the ignore region is rotated and zoomed, not dropped: still a large share of the patch
    assert 0.2 < np.mean(out == IGNORE) < 0.8


def test_deep_supervision_targets_carry_the_ignore_label() -> None:
    _, seg = _sparse_sample((8, 16, 16))
    scales = [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (0.5, 0.25, 0.25)]
    out = downsample_seg_for_ds(seg[None].astype(np.int64), scales)
    for o in out:
        assert set(np.unique(o).tolist()) <= {0, 1, 2, IGNORE}
        half = o.shape[-1] // 2
        assert (o[..., :half] == IGNORE).all() and not (o[..., half:] == IGNORE).any()


def test_loader_batches_hold_ignore_and_forced_samples_hit_annotated_foreground(tmp_path: Path) -> None:
    folder = tmp_path / "3d_fullres"
    ignore_box = {IGNORE: (slice(0, 16), slice(0, 48), slice(8, 40))}  # a big unannotated slab
    write_case(folder, "sparse", CASE_SHAPE, num_channels=1, seed=0,
               boxes={**ignore_box, 1: (slice(1, 3), slice(2, 5), slice(2, 5)),
                      2: (slice(13, 15), slice(43, 46), slice(43, 46))})
    spec = LoaderSpec(data_dir=folder, case_ids=("sparse",), config=CONFIG_3D, augment=AugmentConfig.disabled(),
                      batch_size=3, num_workers=0, seed=0, deep_supervision=True, oversample_foreground=1.0)
    with make_train_loader(spec) as loader:
        seen_ignore = False
        for _ in range(4):
            target = next(loader)["target"]
            full = target[0].numpy()
            assert all(set(np.unique(t.numpy()).tolist()) <= {0, 1, 2, IGNORE} for t in target)
            assert all(((full[i] == 1) | (full[i] == 2)).any() for i in range(3))  # every sample was forced
            seen_ignore |= bool((full == IGNORE).any())
    assert seen_ignore
