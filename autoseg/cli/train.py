"""`autoseg train`: train one model (dataset x configuration x fold), resumable, DDP-ready under torchrun."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click

from autoseg.cli.app import cli, paths_from, tracking_from
from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record
from autoseg.common.paths import DEFAULT_PLANS, TrainingId
from autoseg.evaluate.summary import SUMMARY_FILE, Summary
from autoseg.pipeline.folds import parse_fold
from autoseg.pipeline.run import train_fold
from autoseg.planning.store import resolve_plans
from autoseg.train.config import TrainerConfig, apply_overrides, default_num_workers
from autoseg.train.ddp import DistContext
from autoseg.train.loop import EXIT_INTERRUPTED, TrainingInterrupted


def _env_int(name: str, default: int | None) -> int | None:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return int(text)
    except ValueError:
        raise AutosegError(f"expected an integer, got {text!r}", where=name) from None


def dist_from_env() -> DistContext:
    """Rank / world size / local rank as torchrun sets them (a plain run is rank 0 of 1)."""
    return DistContext(rank=_env_int("RANK", 0) or 0, world_size=_env_int("WORLD_SIZE", 1) or 1,
                       local_rank=_env_int("LOCAL_RANK", 0) or 0)


@cli.command("train")
@click.argument("dataset")
@click.argument("config")
@click.argument("fold")
@click.option("--continue", "resume", is_flag=True, help="Resume from checkpoint_latest.pt (fresh start if none).")
@click.option("--force", is_flag=True, help="Delete this fold's previous outputs and start over.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a TrainerConfig key (every key: docs/training.md). Common ones, with defaults: "
                   "epochs (1000), iterations_per_epoch (250), val_iterations (50), batch_size (the plan's), "
                   "lr (0.01), augment.mirror (true), final_validation (full; no_mirroring or off for a quick "
                   "trial).")
@click.option("--variant", default="default", show_default=True, help="Results sub-folder for an ablation.")
@click.option("--seed", type=int, default=None, help="Seed (adds a seed_<N> folder; overrides --set seed).")
@click.option("--plans", "plans", default=None, metavar="PRESET|FILE",
              help="Train with a preset's plans (resenc-m, resenc-l, resenc-xl: plans_<preset>.json; results in "
                   "<preset>__CONFIG) or with this plans file, instead of the dataset's plans.json.")
@click.option("--pretrained", "pretrained", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="CHECKPOINT", help="Start from this checkpoint's weights (fine-tuning; the segmentation "
                                         "heads stay fresh when the class count differs). Same as --set pretrained=.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--num-workers", type=click.IntRange(min=0), default=None,
              help="Data-augmentation workers (default: $AUTOSEG_NUM_WORKERS, else a share of the CPUs).")
@click.option("--save-probabilities", "--npz", "save_probabilities", is_flag=True,
              help="Keep the final validation's softmax maps (CASE.npz), so find-best can score ensembles.")
@click.option("--validation-only", "--val", "validation_only", is_flag=True,
              help="Only re-run the final validation of a trained fold (from checkpoint_final.pt).")
@click.option("--track", "track", default=None, metavar="BACKEND[:TARGET]",
              help="Log the run to mlflow, tensorboard or wandb (default: $AUTOSEG_TRACK; none: off), e.g. "
                   "mlflow:http://127.0.0.1:5000; docs/tracking.md.")
@click.option("--track-checkpoints", is_flag=True, help="Upload checkpoint_final.pt to the tracker too.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def train_cmd(ctx: click.Context, dataset: str, config: str, fold: str, resume: bool, force: bool,
              overrides: tuple[str, ...], variant: str, seed: int | None, plans: str | None,
              pretrained: Path | None, device: str, num_workers: int | None, save_probabilities: bool,
              validation_only: bool, track: str | None, track_checkpoints: bool, quiet: bool) -> None:
    """Train DATASET's CONFIG on FOLD (0-4 or 'all'), then validate the fold."""
    paths = paths_from(ctx)
    tracking = tracking_from(track, track_checkpoints)
    name = paths.resolve_dataset(dataset)
    plan = None if plans is None else resolve_plans(paths, name, plans)
    tid = TrainingId(name, config, parse_fold(fold), variant, seed, plans=plan.preset if plan else DEFAULT_PLANS)
    cfg = apply_overrides(TrainerConfig(), overrides)
    if pretrained is not None:
        if resume or validation_only:
            raise AutosegError("--pretrained starts a run; a fine-tuned run resumes from its own checkpoint "
                               "with plain --continue", where="--pretrained")
        cfg = dataclasses.replace(cfg, pretrained=str(pretrained.expanduser().resolve()))
    dist = dist_from_env()
    workers = num_workers if num_workers is not None else _env_int(
        "AUTOSEG_NUM_WORKERS", default_num_workers(os.cpu_count() or 1, dist.world_size))
    try:
        r = train_fold(paths, tid, cfg, plan, device, resume, force, workers, quiet, dist,
                       save_probabilities=save_probabilities, validation_only=validation_only, track=tracking)
    except TrainingInterrupted as e:
        click.echo(f"interrupted in epoch {e.epoch}; resume with --continue ({e.checkpoint})", err=True)
        ctx.exit(EXIT_INTERRUPTED)
    if dist.is_main:
        best = "n/a" if r.best_ema_pseudo_dice is None else f"{r.best_ema_pseudo_dice:.4f}"
        word = {"already_finished": "already finished", "validated": "validated"}.get(r.status, "trained")
        click.echo(f"{tid}: {word}, {r.epochs_completed} epochs, best EMA pseudo-Dice {best}; files in {r.fold_dir}")
        if r.validation_dir is not None and r.status != "already_finished":
            _echo_validation(r.validation_dir)


def _echo_validation(validation_dir: Path) -> None:
    """One line with the fold's validation Dice, when its summary exists."""
    file = validation_dir / SUMMARY_FILE
    if file.is_file():
        summary = load_record(file, Summary)
        click.echo(f"validation: {len(summary.cases)} cases, mean foreground Dice "
                   f"{summary.foreground_dice:.4f} ({file})")
