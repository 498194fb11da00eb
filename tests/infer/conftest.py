"""Planned datasets and untrained-but-saved folds for inference tests (tiny networks, CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from autoseg.common.paths import Paths, TrainingId
from autoseg.dataset.spec import load_dataset
from autoseg.fingerprint import extract_fingerprint
from autoseg.nets.unet import build_unet
from autoseg.planning.plan import plan_dataset
from autoseg.planning.plans import Plan
from autoseg.train.checkpoint import Checkpoint, RngState, save_checkpoint
from autoseg.train.config import TrainerConfig

TINY_FEATURES = 4
"""Channel cap for test networks: the topology is the planned one, the width is tiny (CPU speed)."""


def tiny_plan(paths: Paths, dataset: str, preset: str = "default") -> Plan:
    """The real plan (of a planner preset) of a raw dataset with every configuration's widths capped at TINY_FEATURES."""
    plan = plan_dataset(extract_fingerprint(load_dataset(paths.raw_dataset(dataset))), preset=preset)
    configs = {n: dataclasses.replace(c, features_per_stage=tuple(min(f, TINY_FEATURES * 2 ** i)
                                                                  for i, f in enumerate(c.features_per_stage)))
               for n, c in plan.configurations.items()}
    return dataclasses.replace(plan, configurations=configs)


def save_untrained_fold(paths: Paths, plan: Plan, config: str, fold: int | str, seed: int = 0,
                        variant: str = "default", which: str = "final",
                        trainer_config: TrainerConfig | None = None) -> Path:
    """Write checkpoint_<which>.pt of a randomly initialised network in the train stage's format."""
    torch.manual_seed(seed)
    tc = trainer_config or TrainerConfig()
    net = build_unet(plan.configuration(config), plan.num_channels, plan.num_classes,
                     deep_supervision=tc.deep_supervision)
    with torch.no_grad():  # a bias towards foreground so untrained nets predict some labels
        for head in net.heads:
            head.bias.copy_(torch.linspace(-0.2, 0.2, plan.num_classes))
    ckpt = Checkpoint(model_state=net.state_dict(), optimizer_state={}, scaler_state={}, epoch=1,
                      best_ema_pseudo_dice=None, history=[], rng=RngState(torch_cpu=torch.get_rng_state()),
                      trainer_config=tc, plan=plan, config_name=config, dataset=plan.dataset, fold=fold,
                      num_input_channels=plan.num_channels, num_classes=plan.num_classes)
    fold_dir = paths.training_dir(TrainingId(plan.dataset, config, fold, variant, plans=plan.preset))
    save_checkpoint(fold_dir / f"checkpoint_{which}.pt", ckpt)
    return fold_dir


@pytest.fixture(scope="session")
def hippo_trained(hippocampus_small: Paths, tmp_path_factory: pytest.TempPathFactory) -> tuple[Paths, Plan]:
    """Real Hippocampus raw data (shared, read-only) + own results root with 2 untrained 3d_fullres folds
    and one 2d fold."""
    root = tmp_path_factory.mktemp("infer_hippo")
    paths = Paths(raw=hippocampus_small.raw, preprocessed=root / "preprocessed", results=root / "results")
    plan = tiny_plan(paths, "Dataset004_Hippocampus")
    for fold in (0, 1):
        save_untrained_fold(paths, plan, "3d_fullres", fold, seed=fold)
    save_untrained_fold(paths, plan, "2d", 0, seed=7)
    return paths, plan


@pytest.fixture(scope="session")
def phantom_trained(phantom_small: Paths, tmp_path_factory: pytest.TempPathFactory) -> tuple[Paths, Plan]:
    """The oblique anisotropic phantom + one untrained 3d_fullres fold."""
    root = tmp_path_factory.mktemp("infer_phantom")
    paths = Paths(raw=phantom_small.raw, preprocessed=root / "preprocessed", results=root / "results")
    plan = tiny_plan(paths, "Dataset999_Phantom")
    save_untrained_fold(paths, plan, "3d_fullres", 0)
    return paths, plan


def link_inputs(src_images: list[Path], dest: Path) -> Path:
    """A prediction input folder of symlinks (CASE_0000<ending> names kept)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src_images:
        (dest / f.name).symlink_to(f.resolve())
    return dest
