"""Cascade inputs: previous-stage one-hot channels in the loaders, and their seeded degradations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from autoseg.common.errors import AutosegError
from autoseg.data import cascade
from autoseg.data.augment import AugmentConfig
from autoseg.data.cascade import CascadeDegradation, apply_degradation, one_hot_foreground, sample_degradation
from autoseg.data.loader import LoaderSpec, make_train_loader, make_val_loader
from tests.data.conftest import CASE_SHAPE, CONFIG_3D


def _ball(shape: tuple[int, ...], centre: tuple[int, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def test_one_hot_has_a_channel_per_foreground_class() -> None:
    seg = np.array([[0, 1], [2, 2]])
    oh = one_hot_foreground(seg, 3)
    assert oh.shape == (2, 2, 2) and oh.dtype == np.float32
    assert np.array_equal(oh[0], seg == 1) and np.array_equal(oh[1], seg == 2)


def test_binary_operations_are_ball_morphology() -> None:
    mask = _ball((21, 21, 21), (10, 10, 10), 4)
    dil = cascade.binary_operation(mask, "dilation", 2)
    ero = cascade.binary_operation(mask, "erosion", 2)
    assert dil[10, 10, 16] and not dil[10, 10, 17]  # 2 voxels beyond the radius-4 ball
    assert ero[10, 10, 12] and not ero[10, 10, 13]  # more than 2 voxels inside it
    assert (dil >= mask).all() and (ero <= mask).all() and 0 < ero.sum() < mask.sum() < dil.sum()
    # opening removes a thin spur, closing fills a small hole; both keep the bulk
    spur = mask.copy()
    spur[10, 10, 14:20] = True
    assert not cascade.binary_operation(spur, "opening", 1.5)[10, 10, 18]
    hole = mask.copy()
    hole[10, 10, 10] = False
    assert cascade.binary_operation(hole, "closing", 1.5)[10, 10, 10]
    with pytest.raises(ValueError):
        cascade.binary_operation(mask, "skeleton", 1)


def test_degradation_is_identity_unless_drawn_and_keeps_channels_exclusive() -> None:
    seg = np.zeros((20, 20, 20), np.int64)
    seg[_ball(seg.shape, (8, 8, 8), 5)] = 1
    seg[_ball(seg.shape, (8, 8, 14), 3)] = 2
    seg[17:19, 17:19, 17:19] = 1  # a small second component of class 1
    oh = one_hot_foreground(seg, 3)
    assert CascadeDegradation().is_noop
    assert np.array_equal(apply_degradation(oh, CascadeDegradation()), oh)

    grown = apply_degradation(oh, CascadeDegradation(morphology=((1, "dilation", 3.0),)))
    assert grown[1].sum() > oh[1].sum() and (grown.sum(axis=0) <= 1).all()  # taken from class 1 where grown
    assert grown[0].sum() < oh[0].sum()

    # u = 0.99 picks the last eligible component of class 1 in scan order: the small cube
    removed = apply_degradation(oh, CascadeDegradation(remove_component=((0, 0.99),)))
    assert removed[0][17, 17, 17] == 0 and removed[0][8, 8, 8] == 1 and np.array_equal(removed[1], oh[1])
    # a component covering >= 15 % of the patch is never removed
    big = one_hot_foreground(np.pad(np.ones((12, 12, 12), np.int64), 4), 2)
    assert np.array_equal(apply_degradation(big, CascadeDegradation(remove_component=((0, 0.0),))), big)

    rng_draws = [sample_degradation(np.random.default_rng(s), 2) for s in range(200)]
    again = [sample_degradation(np.random.default_rng(s), 2) for s in range(200)]
    assert rng_draws == again  # seeded
    share_morph = np.mean([bool(d.morphology) for d in rng_draws])
    share_remove = np.mean([bool(d.remove_component) for d in rng_draws])
    assert abs(share_morph - cascade.P_MORPHOLOGY_PER_SAMPLE) < 0.12
    assert abs(share_remove - cascade.P_REMOVE_COMPONENT_PER_SAMPLE) < 0.1
    assert all(cascade.MORPHOLOGY_RADIUS_VOX[0] <= r <= cascade.MORPHOLOGY_RADIUS_VOX[1]
               for d in rng_draws for _, _, r in d.morphology)


@pytest.fixture(scope="module")
def previous_stage(preprocessed_cases: tuple[Path, tuple[str, ...]], tmp_path_factory: pytest.TempPathFactory
                   ) -> tuple[Path, ...]:
    """Per case a 'previous stage' label map: class 1 in a slab, class 2 in another (not the truth)."""
    folder = tmp_path_factory.mktemp("prev_stage")
    out = []
    for i, cid in enumerate(preprocessed_cases[1]):
        seg = np.zeros((1, *CASE_SHAPE), np.int8)
        seg[0, :, 10 + i:20 + i] = 1
        seg[0, :, 30:40, 5:25] = 2
        np.save(folder / f"{cid}.npy", seg)
        out.append(folder / f"{cid}.npy")
    return tuple(out)


def _spec(preprocessed_cases: tuple[Path, tuple[str, ...]], previous: tuple[Path, ...], augment: AugmentConfig,
          seed: int = 0) -> LoaderSpec:
    folder, ids = preprocessed_cases
    return LoaderSpec(data_dir=folder, case_ids=ids, config=CONFIG_3D, augment=augment, batch_size=3, num_workers=0,
                      seed=seed, deep_supervision=False, previous_stage=previous, num_classes=3)


def _matches_a_window(one_hot: np.ndarray, previous: list[np.ndarray]) -> bool:
    """The one-hot channels equal some crop (with zero padding) of one case's previous-stage map."""
    seg = one_hot[0] * 1 + one_hot[1] * 2
    for prev in previous:
        padded = np.pad(prev[0], [(p, p) for p in CONFIG_3D.patch_size])
        for z in range(padded.shape[0] - seg.shape[0] + 1):
            for y in range(padded.shape[1] - seg.shape[1] + 1):
                window = padded[z:z + seg.shape[0], y:y + seg.shape[1]]
                # along x every crop of a slab map is determined by its column pattern
                for x in range(padded.shape[2] - seg.shape[2] + 1):
                    if np.array_equal(window[..., x:x + seg.shape[2]], seg):
                        return True
    return False


def test_val_loader_appends_the_previous_stage_unchanged(preprocessed_cases, previous_stage) -> None:
    spec = _spec(preprocessed_cases, previous_stage, AugmentConfig.disabled())
    with make_val_loader(spec) as loader:
        batch = next(loader)
    data = batch["data"].numpy()
    assert data.shape == (3, 2 + 2, *CONFIG_3D.patch_size)  # C image channels + K-1 one-hot
    prev = [np.load(p) for p in previous_stage]
    for sample in data:
        one_hot = sample[2:]
        assert set(np.unique(one_hot)) <= {0.0, 1.0} and (one_hot.sum(axis=0) <= 1).all()
        assert _matches_a_window(one_hot, prev)
        assert sample[:2].min() > 0 or (sample[:2] == 0).any()  # image channels untouched by the one-hot


def test_train_loader_degrades_only_when_drawn(preprocessed_cases, previous_stage, monkeypatch) -> None:
    no_aug = AugmentConfig.disabled()
    plain_batches = []
    monkeypatch.setattr(cascade, "P_MORPHOLOGY_PER_SAMPLE", 0.0)
    monkeypatch.setattr(cascade, "P_REMOVE_COMPONENT_PER_SAMPLE", 0.0)
    with make_train_loader(_spec(preprocessed_cases, previous_stage, no_aug, seed=3)) as loader:
        plain_batches = [next(loader)["data"].numpy() for _ in range(2)]
    prev = [np.load(p) for p in previous_stage]
    assert all(_matches_a_window(s[2:], prev) for b in plain_batches for s in b)

    monkeypatch.setattr(cascade, "P_MORPHOLOGY_PER_SAMPLE", 1.0)
    monkeypatch.setattr(cascade, "MORPHOLOGY_OPERATIONS", ("dilation",))
    with make_train_loader(_spec(preprocessed_cases, previous_stage, no_aug, seed=3)) as loader:
        degraded = [next(loader)["data"].numpy() for _ in range(2)]
    # the first sample is cut before any degradation draw: same window, but its classes have grown
    plain, deg = plain_batches[0][0], degraded[0][0]
    assert np.array_equal(plain[:2], deg[:2])
    assert deg[2:].sum() > plain[2:].sum() > 0
    assert (deg[2:].sum(axis=0) <= 1).all() and (deg[2:] >= plain[2:]).any()


def test_spatial_augmentation_moves_the_previous_stage_with_the_labels(preprocessed_cases, tmp_path) -> None:
    """Previous stage == truth: after mirroring/rotation the one-hot channels still equal the target."""
    folder, ids = preprocessed_cases
    prev = []
    for cid in ids:
        np.save(tmp_path / f"{cid}.npy", np.load(folder / f"{cid}_seg.npy"))
        prev.append(tmp_path / f"{cid}.npy")
    spatial_only = dataclasses.replace(AugmentConfig.disabled(), mirror=True, rotation=True, p_rotation=1.0)
    spec = dataclasses.replace(_spec(preprocessed_cases, tuple(prev), spatial_only, seed=5), oversample_foreground=1.0)
    import autoseg.data.cascade as casc
    old = (casc.P_MORPHOLOGY_PER_SAMPLE, casc.P_REMOVE_COMPONENT_PER_SAMPLE)
    casc.P_MORPHOLOGY_PER_SAMPLE = casc.P_REMOVE_COMPONENT_PER_SAMPLE = 0.0
    try:
        with make_train_loader(spec) as loader:
            batch = next(loader)
    finally:
        casc.P_MORPHOLOGY_PER_SAMPLE, casc.P_REMOVE_COMPONENT_PER_SAMPLE = old
    target = batch["target"].numpy()[:, 0]
    one_hot = batch["data"].numpy()[:, 2:]
    assert target.max() > 0
    assert np.array_equal(one_hot[:, 0] + 2 * one_hot[:, 1], target)


def test_missing_previous_stage_file_is_named(preprocessed_cases, previous_stage, tmp_path) -> None:
    bad = (*previous_stage[:-1], tmp_path / "absent.npy")
    with pytest.raises(AutosegError, match="previous-stage segmentation missing") as info:
        make_val_loader(_spec(preprocessed_cases, bad, AugmentConfig.disabled()))
    assert info.value.where == str(tmp_path / "absent.npy") or str(info.value.where).endswith("absent.npy")
