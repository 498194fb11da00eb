"""export-model of a cascade: its previous stage goes along (recorded as such), and the installed
model predicts through both stages exactly like the original results folder.

The folds are untrained networks saved as ordinary checkpoints (what export reads is the checkpoint
format, not how the weights were learned), so the test needs no training.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.common.paths import Paths, TrainingId
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.nets.unet import build_unet
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.train.checkpoint import Checkpoint, RngState, save_checkpoint
from autoseg.train.config import TrainerConfig
from autoseg.train.run import input_channels
from tests.helpers import run_cli_ok

DATASET = "Dataset999_Phantom"


def _fake_fold(paths: Paths, plan, config: str, fold: int, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = TrainerConfig()
    net = build_unet(plan.configuration(config), input_channels(plan, config), plan.num_classes,
                     deep_supervision=bool(cfg.deep_supervision))
    fold_dir = paths.training_dir(TrainingId(DATASET, config, fold))
    fold_dir.mkdir(parents=True)
    save_checkpoint(fold_dir / "checkpoint_final.pt", Checkpoint(
        model_state=net.state_dict(), optimizer_state={"state": {}}, scaler_state={}, epoch=1,
        best_ema_pseudo_dice=None, history=[], rng=RngState(torch_cpu=torch.get_rng_state()), trainer_config=cfg,
        plan=plan, config_name=config, dataset=DATASET, fold=fold, num_input_channels=input_channels(plan, config),
        num_classes=plan.num_classes))


@pytest.fixture(scope="module")
def cascade(tmp_path_factory: pytest.TempPathFactory):
    paths = Paths.under(tmp_path_factory.mktemp("exchange_cascade"))
    make_phantom_dataset(paths.raw, PhantomRecipe(num_training=3, num_test=1, shape=(12, 40, 40), shape_jitter=4))
    plan = plan_and_save(paths, DATASET, PlanRequest(configs=("3d_cascade_fullres",), progress_bar=False)).plan
    _fake_fold(paths, plan, "3d_lowres", 0, seed=1)
    _fake_fold(paths, plan, "3d_cascade_fullres", 0, seed=2)
    return paths


def _probabilities(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(folder.glob("*.npz")):
        with np.load(p) as z:
            out[p.stem] = z["probabilities"]
    return out


def test_cascade_export_carries_previous_stage_and_predicts_the_same(cascade: Paths, tmp_path: Path):
    paths = cascade
    zip_path = tmp_path / "cascade.zip"
    run_cli_ok(paths, "export-model", "999", "-c", "3d_cascade_fullres", "-f", "0", "-o", str(zip_path))
    with zipfile.ZipFile(zip_path) as zf:
        manifest = json.loads(zf.read(f"{DATASET}/manifest.json"))
        names = set(zf.namelist())
    assert manifest["configs"] == ["3d_cascade_fullres"] and manifest["previous_stages"] == ["3d_lowres"]
    for config in ("3d_lowres", "3d_cascade_fullres"):
        assert f"{DATASET}/{config}/default/fold_0/checkpoint_final.pt" in names
    fresh = Paths(raw=tmp_path / "no_raw", preprocessed=tmp_path / "no_pre", results=tmp_path / "results")
    run_cli_ok(fresh, "install-model", str(zip_path))
    inputs = paths.raw / DATASET / "imagesTs"
    common = ["-i", str(inputs), "--device", "cpu", "--no-tta", "--save-probabilities"]
    run_cli_ok(paths, "predict", "-d", "999", "-c", "3d_cascade_fullres", "-f", "0", "-o", str(tmp_path / "orig"),
               *common)
    run_cli_ok(fresh, "predict", "-m", str(fresh.results / DATASET), "-o", str(tmp_path / "by_m"), *common)
    want, got = _probabilities(tmp_path / "orig"), _probabilities(tmp_path / "by_m")
    assert len(want) == 1 and got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    masks = sorted(p.name for p in (tmp_path / "orig").glob("*.nii.gz"))
    assert masks and all((tmp_path / "orig" / n).read_bytes() == (tmp_path / "by_m" / n).read_bytes() for n in masks)
