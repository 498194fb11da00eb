"""What only a GPU can check (``gpu`` marker: skipped without CUDA; benchmarks/gpu_check.sh runs them).

The device-augmented loader on CUDA (pinned crops copied without blocking, batch augmented on
the GPU, same draws as on the CPU), and a real CLI training on CUDA with the defaults there:
bf16 autocast, torch.compile and augmentation on the device.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autoseg.data.augment import AugmentConfig
from autoseg.data.loader import DeviceAugmentedLoader, LoaderSpec, make_train_loader
from tests.data.conftest import CONFIG_3D
from tests.helpers import train_tiny_phantom

pytestmark = pytest.mark.gpu

EXACT_ONLY = dataclasses.replace(AugmentConfig.disabled(), mirror=True, gamma=True, p_gamma=0.5)


def _spec(cases, augment: AugmentConfig, workers: int = 1) -> LoaderSpec:
    folder, ids = cases
    return LoaderSpec(data_dir=folder, case_ids=ids, config=CONFIG_3D, augment=augment, batch_size=4,
                      num_workers=workers, seed=3, deep_supervision=True, pin_memory=True)


def test_device_loader_on_cuda_matches_the_cpu_path(preprocessed_cases) -> None:
    spec = _spec(preprocessed_cases, dataclasses.replace(EXACT_ONLY, device="device"))
    with make_train_loader(spec, "cuda") as loader:
        assert isinstance(loader, DeviceAugmentedLoader)
        gpu = [next(loader) for _ in range(3)]
    with make_train_loader(dataclasses.replace(spec, augment=dataclasses.replace(EXACT_ONLY, device="cpu")),
                           "cuda") as loader:
        cpu = [next(loader) for _ in range(3)]
    for g, c in zip(gpu, cpu):
        assert g["data"].device.type == "cuda" and all(t.device.type == "cuda" for t in g["target"])
        torch.testing.assert_close(g["data"].cpu(), c["data"], rtol=1e-4, atol=1e-4)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(g["target"], c["target"]))


def test_full_augmentation_on_cuda_keeps_labels(preprocessed_cases) -> None:
    spec = _spec(preprocessed_cases, AugmentConfig(device="device", p_rotation=1.0, p_scaling=1.0))
    with make_train_loader(spec, "cuda") as loader:
        batch = next(loader)
    assert torch.isfinite(batch["data"]).all()
    assert set(torch.unique(batch["target"][0]).tolist()) <= {0, 1, 2}


def test_cli_training_on_cuda_with_bf16_compile_and_device_augmentation(tmp_path) -> None:
    # amp, compile and augment.device left at auto: bf16, compiled, augmented on the GPU
    lines = train_tiny_phantom(tmp_path, "cuda", ["epochs=2", "iterations_per_epoch=3", "val_iterations=1",
                                                  "batch_size=2", "num_workers=1", "final_validation=off"])
    assert [r["augment_device"] for r in lines] == ["device", "device"]
    assert all(r["train_loss"] is not None and r["train_loss"] == r["train_loss"] for r in lines)
