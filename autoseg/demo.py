"""The embedded default: the whole pipeline on a generated phantom dataset (``autoseg demo``).

Every step is the real one a user runs on their own data — verify, fingerprint, plan,
preprocess, train, predict held-out cases, evaluate — only the schedule is short so that it
finishes in minutes on a 2-core CPU. Re-running continues where the last run stopped (the
dataset, plan and preprocessed data are reused; training resumes from its checkpoint).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from autoseg.common.paths import Paths, TrainingId
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.evaluate.summary import Summary, evaluate_folder
from autoseg.infer.predict import PredictRequest, run_prediction
from autoseg.planning.planner import PlanRequest, plan_and_save
from autoseg.preprocess import preprocess_dataset
from autoseg.train.config import TrainerConfig, apply_overrides
from autoseg.train.run import TrainResult, train_fold

log = logging.getLogger(__name__)

DEMO_DATASET = "Dataset999_Phantom"

DEMO_CONFIG = "3d_fullres"
"""The phantom is anisotropic 3D data; 3d_fullres is the configuration nnU-Net users reach for first."""

DEMO_TRAINER_OVERRIDES: tuple[str, ...] = (
    "epochs=12",
    "iterations_per_epoch=20",
    "val_iterations=4",
)
"""A short schedule (240 iterations) that fits in a few minutes on 2 CPU cores; everything else
is nnU-Net's default (SGD 0.01 poly, Dice+CE, deep supervision, full augmentation)."""


@dataclass(frozen=True)
class DemoOptions:
    """What `run_demo` does; every field has a CLI option."""

    workdir: Path = Path("autoseg_demo")
    recipe: PhantomRecipe = PhantomRecipe()
    trainer_overrides: tuple[str, ...] = DEMO_TRAINER_OVERRIDES
    device: str = "auto"
    num_workers: int = 2
    """Processes for fingerprinting / preprocessing and data-augmentation workers for training."""
    show_progress: bool = True


@dataclass(frozen=True)
class DemoResult:
    """Where everything went and the held-out evaluation."""

    paths: Paths
    train: TrainResult
    predictions: Path
    summary: Summary


def run_demo(options: DemoOptions = DemoOptions()) -> DemoResult:
    """Build (or reuse) the phantom dataset and run plan → preprocess → train → predict → evaluate."""
    paths = Paths.under(options.workdir.resolve())
    raw = paths.raw_dataset(DEMO_DATASET)
    if not (raw / "dataset.json").exists():
        log.info("generating the phantom dataset in %s", raw)
        make_phantom_dataset(paths.raw, options.recipe, DEMO_DATASET)
    plan = plan_and_save(paths, DEMO_DATASET, PlanRequest(
        configs=(DEMO_CONFIG,), num_workers=options.num_workers,
        progress_bar=options.show_progress)).plan
    preprocess_dataset(paths, DEMO_DATASET, [DEMO_CONFIG], num_workers=options.num_workers, plan=plan)
    cfg = apply_overrides(TrainerConfig(), options.trainer_overrides)
    # fold "all": train on every training case; the held-out imagesTs cases measure the result
    result = train_fold(paths, TrainingId(DEMO_DATASET, DEMO_CONFIG, "all"), cfg, plan=plan,
                        device=options.device, resume=True, num_workers=options.num_workers,
                        quiet=not options.show_progress)
    predictions = paths.results_dataset(DEMO_DATASET) / "demo_predictions"
    run_prediction(paths, PredictRequest(
        dataset=DEMO_DATASET, configs=(DEMO_CONFIG,), folds=("all",), input_dir=raw / "imagesTs",
        output_dir=predictions, device=options.device, force=True), show_progress=options.show_progress)
    summary = evaluate_folder(predictions, raw / "labelsTs", plan.labels, options.recipe.file_ending,
                              output_file=predictions / "summary.json", force=True,
                              show_progress=options.show_progress)
    return DemoResult(paths=paths, train=result, predictions=predictions, summary=summary)
