"""The loaders on real preprocessed MSD Hippocampus cases (planner + preprocessing of this tree)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoseg.common.paths import Paths
from autoseg.data.augment import AugmentConfig
from autoseg.data.loader import LoaderSpec, make_train_loader, make_val_loader
from autoseg.nets.unet import build_unet
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.preprocess import preprocess_dataset
from tests.helpers import (
    HIPPOCAMPUS_MISSING,
    hippocampus_available,
    hippocampus_case_ids,
    link_hippocampus_subset,
)

pytestmark = pytest.mark.skipif(not hippocampus_available(), reason=HIPPOCAMPUS_MISSING)

DATASET = "Dataset004_Hippocampus"


@pytest.fixture(scope="module")
def hippo_preprocessed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[str, ...], object]:
    """Three real cases, planned and preprocessed for 3d_fullres in a private root."""
    paths = Paths.under(tmp_path_factory.mktemp("data_hippo"))
    ids = tuple(hippocampus_case_ids(3))
    link_hippocampus_subset(paths.raw, list(ids))
    plan = plan_and_save(paths, DATASET, PlanRequest(configs=("3d_fullres",),
                                                                             progress_bar=False)).plan
    folders = preprocess_dataset(paths, DATASET, ["3d_fullres"], plan=plan)
    return folders["3d_fullres"], ids, plan


def test_real_batches_fit_the_planned_network(hippo_preprocessed) -> None:
    folder, ids, plan = hippo_preprocessed
    config = plan.configuration("3d_fullres")
    spec = LoaderSpec(data_dir=folder, case_ids=ids, config=config, augment=AugmentConfig(), batch_size=3,
                      num_workers=0, seed=0, deep_supervision=True)
    with make_train_loader(spec) as train:
        batch = next(train)
    assert batch["data"].shape == (3, plan.num_channels) + tuple(config.patch_size)
    net = build_unet(config, plan.num_channels, plan.num_classes)
    with torch.no_grad():
        outputs = net(batch["data"])
    assert [tuple(t.shape[2:]) for t in batch["target"]] == [tuple(o.shape[2:]) for o in outputs]
    with make_val_loader(spec) as val:
        targets = [next(val)["target"][0] for _ in range(3)]
    assert all(int(t[2].max()) > 0 for t in targets)  # the forced last sample holds hippocampus
    assert max(int(t.max()) for t in targets) == 2
