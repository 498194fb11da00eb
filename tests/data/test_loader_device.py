"""The loader split of ``augment.device=device``: workers crop, the batch is augmented on the device.

Runs on the CPU (the "device" is the CPU here); tests/data/test_augment_gpu.py repeats the key
checks on CUDA where one is present.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from autoseg.data.augment import AugmentConfig, resolve_augment_device
from autoseg.data.loader import BatchLoader, DeviceAugmentedLoader, LoaderSpec, make_train_loader
from tests.data.conftest import CONFIG_3D, CONFIG_3D_ANISO
from tests.helpers import train_tiny_phantom

EXACT_ONLY = dataclasses.replace(AugmentConfig.disabled(), mirror=True, gamma=True, p_gamma=0.5, p_gamma_inverted=0.3)
"""Transforms whose two implementations agree to float precision: flips, gamma, and the crop."""


def _spec(cases, augment: AugmentConfig, device: str, config=CONFIG_3D, workers: int = 0, seed: int = 4) -> LoaderSpec:
    folder, ids = cases
    return LoaderSpec(data_dir=folder, case_ids=ids, config=config,
                      augment=dataclasses.replace(augment, device=device), batch_size=4, num_workers=workers,
                      seed=seed, deep_supervision=True)


def _batches(spec: LoaderSpec, n: int) -> list[dict]:
    with make_train_loader(spec, "cpu") as loader:
        return [next(loader) for _ in range(n)]


def test_auto_is_device_on_cuda_and_cpu_on_the_cpu() -> None:
    assert resolve_augment_device("auto", "cuda") == "device"
    assert resolve_augment_device("auto", "cpu") == "cpu"
    assert resolve_augment_device("cpu", "cuda") == "cpu" and resolve_augment_device("device", "cpu") == "device"


def test_make_train_loader_picks_the_path(preprocessed_cases) -> None:
    with make_train_loader(_spec(preprocessed_cases, AugmentConfig(), "device"), "cpu") as loader:
        assert isinstance(loader, DeviceAugmentedLoader)
    with make_train_loader(_spec(preprocessed_cases, AugmentConfig(), "auto"), "cpu") as loader:
        assert isinstance(loader, BatchLoader)


@pytest.mark.parametrize("config", [CONFIG_3D, CONFIG_3D_ANISO], ids=["3d", "dummy2d"])
def test_same_seed_same_batches_on_both_paths_for_the_exact_transforms(preprocessed_cases, config) -> None:
    """Same draws, same order: crops, flips and gamma of the two paths agree batch for batch."""
    cpu = _batches(_spec(preprocessed_cases, EXACT_ONLY, "cpu", config), 3)
    dev = _batches(_spec(preprocessed_cases, EXACT_ONLY, "device", config), 3)
    for a, b in zip(cpu, dev):
        np.testing.assert_allclose(b["data"].numpy(), a["data"].numpy(), rtol=1e-4, atol=1e-4)
        assert len(a["target"]) == len(b["target"])
        for ta, tb in zip(a["target"], b["target"]):
            assert tb.dtype == torch.int64 and torch.equal(ta, tb)


def test_full_augmentation_on_the_device_keeps_shapes_labels_and_seed(preprocessed_cases) -> None:
    spec = _spec(preprocessed_cases, AugmentConfig(p_rotation=1.0, p_scaling=1.0), "device")
    first, again = _batches(spec, 3), _batches(spec, 3)
    for a, b in zip(first, again):  # a seed reproduces the batches
        assert torch.equal(a["data"], b["data"]) and all(torch.equal(x, y) for x, y in zip(a["target"], b["target"]))
    batch = first[0]
    assert batch["data"].shape == (4, 2, *CONFIG_3D.patch_size) and batch["data"].dtype == torch.float32
    assert torch.isfinite(batch["data"]).all()
    assert set(torch.unique(batch["target"][0]).tolist()) <= {0, 1, 2}
    assert [tuple(t.shape[2:]) for t in batch["target"]][:2] == [(8, 16, 16), (4, 8, 8)]


def test_device_path_with_worker_processes_matches_in_process(preprocessed_cases) -> None:
    """Parameters travel from the worker processes with the crops (the seed fixes the sequence)."""
    in_process = _batches(_spec(preprocessed_cases, AugmentConfig(), "device"), 2)
    workers = _batches(_spec(preprocessed_cases, AugmentConfig(), "device", workers=1), 2)
    for a, b in zip(in_process, workers):
        assert torch.equal(a["data"], b["data"])


def test_cli_training_with_device_augmentation_logs_its_choice(tmp_path) -> None:
    lines = train_tiny_phantom(tmp_path, "cpu", ["epochs=2", "iterations_per_epoch=2", "val_iterations=1",
                                                 "batch_size=2", "num_workers=0", "final_validation=off",
                                                 "augment.device=device"])
    assert [r["augment_device"] for r in lines] == ["device", "device"]
    assert all(np.isfinite(r["train_loss"]) for r in lines)
    fold_dir = next(tmp_path.rglob("training_log.jsonl")).parent
    saved = json.loads((fold_dir / "trainer_config.json").read_text(encoding="utf-8"))
    assert saved["augment"]["device"] == "device"
