"""Hand-built plans and tiny synthetic cases for the preprocessing tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.common.paths import Paths
from autoseg.dataset.io import Geometry
from autoseg.planning.plans import ChannelNormalization, Configuration, Plan

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def make_config(name: str, spacing: tuple[float, ...], data_identifier: str | None = None) -> Configuration:
    """A configuration with the given target spacing (2 entries = 2D); network numbers are irrelevant here."""
    nd = len(spacing)
    return Configuration(name=name, data_identifier=data_identifier or name, spacing=tuple(spacing),
                         patch_size=(16,) * nd, batch_size=2, median_shape=(16,) * nd,
                         strides=((1,) * nd, (2,) * nd), kernel_sizes=((3,) * nd, (3,) * nd),
                         features_per_stage=(8, 16))


def make_plan(configs: list[Configuration], transpose: tuple[int, int, int] = (0, 1, 2),
              norm: ChannelNormalization = ChannelNormalization("zscore"), dataset: str = "Dataset999_Phantom",
              n_channels: int = 1, labels: dict[str, int] = LABELS) -> Plan:
    backward = tuple(int(i) for i in np.argsort(transpose))
    return Plan(dataset=dataset, gpu_memory_gb=8.0, channel_names={i: "MRI" for i in range(n_channels)},
                labels=dict(labels), transpose_forward=transpose, transpose_backward=backward,  # type: ignore[arg-type]
                original_median_spacing=(1.0, 1.0, 1.0), original_median_shape=(16, 16, 16),
                normalization=(norm,) * n_channels, configurations={c.name: c for c in configs})


def blob_case(shape: tuple[int, int, int] = (10, 24, 20), spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
              pad: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """A (1, z, y, x) image that is zero on a ``pad`` border, with a two-class ellipsoid label inside."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = z ** 2 + y ** 2 + x ** 2
    seg = np.zeros(shape, np.uint8)
    seg[r < 0.6] = 1
    seg[r < 0.15] = 2
    img = (100.0 + 50.0 * seg + rng.normal(0, 5, shape)).astype(np.float32)
    inner = np.zeros(shape, bool)
    inner[pad:-pad or None, pad:-pad or None, pad:-pad or None] = True
    img[~inner] = 0
    seg[~inner] = 0
    geom = Geometry(shape=shape, spacing=spacing, origin=(10.0, -20.0, 5.5),
                    direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0), file_ndim=3)
    return img[None], seg, geom


def own_roots(shared: Paths, tmp_path: Path) -> Paths:
    """The shared fixture's raw root with this test's own preprocessed/results roots (no cross-test state)."""
    return Paths(raw=shared.raw, preprocessed=tmp_path / "preprocessed", results=tmp_path / "results")
