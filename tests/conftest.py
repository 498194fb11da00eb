"""Shared fixtures: the real Hippocampus cases (read in place) and generated phantom datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoseg.common.paths import Paths
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from tests.helpers import HIPPOCAMPUS_MISSING, hippocampus_available, hippocampus_case_ids, link_hippocampus_subset

requires_hippocampus = pytest.mark.skipif(not hippocampus_available(),
                                          reason=HIPPOCAMPUS_MISSING)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly, once, that the real-data tests did not run: a skip must not pass for a pass."""
    if not hippocampus_available():
        terminalreporter.write_line(f"WARNING: real-data tests skipped: {HIPPOCAMPUS_MISSING}", yellow=True, bold=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu``-marked tests need CUDA: skipped, with that reason, on a machine without it
    (benchmarks/gpu_check.sh runs them with ``-m gpu`` where a GPU is lent)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skipif(True, reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    """Fresh raw/preprocessed/results roots under the test's tmp dir."""
    return Paths.under(tmp_path / "data")


@pytest.fixture(scope="session")
def hippocampus_small(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """Session-wide raw root holding Dataset004_Hippocampus with 12 real cases (symlinked)."""
    if not hippocampus_available():
        pytest.skip(HIPPOCAMPUS_MISSING)
    root = tmp_path_factory.mktemp("hippo_small")
    paths = Paths.under(root)
    link_hippocampus_subset(paths.raw, hippocampus_case_ids(12))
    return paths


@pytest.fixture(scope="session")
def phantom_small(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """Session-wide raw root holding Dataset999_Phantom: 8 tiny anisotropic oblique cases."""
    root = tmp_path_factory.mktemp("phantom_small")
    paths = Paths.under(root)
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=8, num_test=2, shape=(12, 40, 40),
                                                  shape_jitter=4))
    return paths
