"""Fixtures for the training tests: a tiny plan, a tiny network and synthetic batch streams."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from autoseg.nets.unet import build_unet, deep_supervision_scales
from autoseg.planning.plans import ChannelNormalization, Configuration, Plan
from autoseg.train.config import TrainerConfig
from autoseg.train.ddp import DistContext
from autoseg.train.loop import FitSetup, RunMeta, Runtime
from autoseg.train.losses import build_loss

NUM_CLASSES = 3


def tiny_plan(patch: tuple[int, int, int] = (16, 16, 16)) -> Plan:
    """A hand-made plan with one very small 3d configuration (3 stages, 4-8-16 features)."""
    config = Configuration(
        name="3d_fullres", data_identifier="3d_fullres", spacing=(1.0, 1.0, 1.0), patch_size=patch,
        batch_size=2, median_shape=(32, 32, 32), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
        kernel_sizes=((3, 3, 3),) * 3, features_per_stage=(4, 8, 16))
    return Plan(dataset="Dataset990_Tiny", gpu_memory_gb=8.0, channel_names={0: "MRI"},
                labels={"background": 0, "a": 1, "b": 2}, transpose_forward=(0, 1, 2),
                transpose_backward=(0, 1, 2), original_median_spacing=(1.0, 1.0, 1.0),
                original_median_shape=(32, 32, 32), normalization=(ChannelNormalization("zscore"),),
                configurations={"3d_fullres": config})


class SyntheticBatches:
    """An infinite stream of easy batches: two cuboids of different brightness = classes 1 and 2."""

    def __init__(self, config: Configuration, batch_size: int, seed: int, deep_supervision: bool) -> None:
        self.config, self.batch_size, self.ds = config, batch_size, deep_supervision
        self.rng = np.random.default_rng(seed)
        self.closed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        shape = self.config.patch_size
        seg = np.zeros((self.batch_size, 1, *shape), np.float32)
        for b in range(self.batch_size):
            for label in (1, 2):
                lo = self.rng.integers(0, shape[0] // 2, size=3)
                sl = tuple(slice(int(a), int(a) + 6) for a in lo)
                seg[(b, 0, *sl)] = label
        data = seg * 1.5 + self.rng.normal(0, 0.3, seg.shape).astype(np.float32)
        target: Any = torch.from_numpy(seg)
        if self.ds:
            scales = deep_supervision_scales(self.config)
            target = [torch.from_numpy(seg[(slice(None), slice(None),
                                            *(slice(None, None, round(1 / f)) for f in s))].copy())
                      for s in scales]
        return {"data": torch.from_numpy(data), "target": target}

    def close(self) -> None:
        self.closed = True


def make_setup(tmp: Path, cfg: TrainerConfig, plan: Plan | None = None, seed: int = 0,
               batch_size: int = 2, distributed: bool = False) -> FitSetup:
    """A FitSetup with the tiny network and synthetic batches, writing into ``tmp``."""
    plan = plan or tiny_plan()
    config = plan.configurations["3d_fullres"]
    torch.manual_seed(cfg.seed)
    net = build_unet(config, 1, NUM_CLASSES, deep_supervision=cfg.deep_supervision)
    num_ds = len(deep_supervision_scales(config)) if cfg.deep_supervision else 1
    meta = RunMeta(plan=plan, config_name="3d_fullres", dataset=plan.dataset, fold=0,
                   num_input_channels=1, num_classes=NUM_CLASSES)
    tmp.mkdir(parents=True, exist_ok=True)
    return FitSetup(net=net, loss_fn=build_loss(cfg.loss, True, num_ds, distributed),
                    train_batches=SyntheticBatches(config, batch_size, seed, cfg.deep_supervision),
                    val_batches=SyntheticBatches(config, batch_size, seed + 1, cfg.deep_supervision),
                    cfg=cfg, meta=meta, out_dir=tmp, rng=np.random.default_rng(cfg.seed))


def cpu_runtime(dist: DistContext | None = None) -> Runtime:
    return Runtime(device=torch.device("cpu"), dist=dist or DistContext(), quiet=True)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The test machine's cores are shared: keep torch to one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
