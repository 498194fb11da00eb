"""`autoseg preprocess`: crop, normalize and resample every training case; make the splits."""

from __future__ import annotations


import click

from autoseg.cli.app import cli, paths_from
from autoseg.planning.store import resolve_plans
from autoseg.preprocess import list_preprocessed_cases, load_dataset_plan, median_preprocessed_shape, preprocess_dataset
from autoseg.splits import user_splits_file


def _config_names(options: tuple[str, ...], positional: tuple[str, ...]) -> list[str]:
    """``--configs 2d 3d_fullres``, ``--configs 2d --configs 3d_fullres`` and ``--configs 2d,3d_fullres`` alike."""
    names = [n.strip() for value in (*options, *positional) for n in value.split(",") if n.strip()]
    return list(dict.fromkeys(names))


@cli.command("preprocess")
@click.argument("dataset")
@click.argument("more_configs", nargs=-1, metavar="[CONFIG]...")
@click.option("--configs", "-c", multiple=True, metavar="NAME...",
              help="Configurations to preprocess (default: every one in the plan), e.g. --configs 2d 3d_fullres.")
@click.option("-j", "--num-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (cases run in parallel).")
@click.option("--plans", "plans", default=None, metavar="PRESET|FILE",
              help="Use a preset's plans (resenc-m, resenc-l, resenc-xl) or this plans file (e.g. a sweep's "
                   "derived plan) instead of the dataset's plans.json.")
@click.option("--force", is_flag=True, help="Redo cases that are already preprocessed.")
@click.pass_context
def preprocess_cmd(ctx: click.Context, dataset: str, more_configs: tuple[str, ...], configs: tuple[str, ...],
                   num_workers: int, plans: str | None, force: bool) -> None:
    """Preprocess DATASET for the planned configurations and write splits.json (5 folds)."""
    paths = paths_from(ctx)
    name = paths.resolve_dataset(dataset)
    plan = load_dataset_plan(paths, name) if plans is None else resolve_plans(paths, name, plans)
    folders = preprocess_dataset(paths, name, _config_names(configs, more_configs), num_workers, force, plan)
    for config, folder in folders.items():
        shape = median_preprocessed_shape(folder)
        median = "x".join(map(str, shape)) if shape else "-"
        click.echo(f"{config:<12} {len(list_preprocessed_cases(folder)):>5} cases  median shape {median:<14} {folder}")
    user = user_splits_file(paths, name)
    click.echo(f"splits: {user if user.exists() else paths.splits_file(name)}")
