"""Tiny synthetic preprocessed folders in the on-disk layout of docs/architecture.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoseg.planning.plans import Configuration

CASE_SHAPE = (16, 48, 48)
"""(z, y, x) of the synthetic cases: larger than the test patches, so placement matters."""

FOREGROUND_BOXES = {1: (slice(1, 3), slice(2, 5), slice(2, 5)), 2: (slice(13, 15), slice(43, 46), slice(43, 46))}
"""Two tiny labelled boxes in opposite corners: a uniform patch rarely hits them, a forced one always does."""


def write_case(folder: Path, case_id: str, shape: tuple[int, int, int], num_channels: int, seed: int,
               boxes: dict[int, tuple[slice, ...]] | None = None) -> None:
    """One preprocessed case: positive float32 data, int8 labels, foreground coordinates."""
    rng = np.random.default_rng(seed)
    data = rng.uniform(0.5, 1.5, size=(num_channels,) + shape).astype(np.float32)
    seg = np.zeros((1,) + shape, dtype=np.int8)
    for label, box in (FOREGROUND_BOXES if boxes is None else boxes).items():
        seg[(0,) + box] = label
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{case_id}.npy", data)
    np.save(folder / f"{case_id}_seg.npy", seg)
    np.savez(folder / f"{case_id}_fg.npz",
             **{f"class_{k}": np.argwhere(seg[0] == k) for k in (1, 2)})
    # preprocessing writes CaseProperties last; the loader only checks that it exists
    (folder / f"{case_id}.json").write_text("{}\n")


@pytest.fixture(scope="session")
def preprocessed_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[str, ...]]:
    """Three 2-channel cases of CASE_SHAPE plus one case smaller than every patch."""
    folder = tmp_path_factory.mktemp("preprocessed") / "3d_fullres"
    ids = ("case_a", "case_b", "case_c")
    for i, cid in enumerate(ids):
        write_case(folder, cid, CASE_SHAPE, num_channels=2, seed=i)
    write_case(folder, "tiny", (4, 6, 6), num_channels=2, seed=9, boxes={1: (slice(1, 2), slice(2, 3), slice(2, 3))})
    return folder, ids


def make_config(patch: tuple[int, ...], strides: tuple[tuple[int, ...], ...],
                features: tuple[int, ...] | None = None) -> Configuration:
    ndim = len(patch)
    return Configuration(name=f"{ndim}d_test", data_identifier="3d_fullres", spacing=(1.0,) * ndim,
                         patch_size=patch, batch_size=3, median_shape=CASE_SHAPE[-ndim:], strides=strides,
                         kernel_sizes=tuple((3,) * ndim for _ in strides),
                         features_per_stage=features or tuple(4 * 2**i for i in range(len(strides))))


CONFIG_3D = make_config((8, 16, 16), ((1, 1, 1), (2, 2, 2), (2, 2, 2)))
CONFIG_3D_ANISO = make_config((4, 16, 16), ((1, 1, 1), (1, 2, 2), (2, 2, 2)))
CONFIG_2D = make_config((16, 24), ((1, 1), (2, 2), (2, 2)))
