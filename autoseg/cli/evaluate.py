"""Evaluation commands: `autoseg evaluate` and `autoseg find-best`."""

from __future__ import annotations

from pathlib import Path

import click

from autoseg.cli.app import cli, paths_from
from autoseg.cli.predict import multi_value_command
from autoseg.dataset.spec import LabelScheme, read_dataset_json
from autoseg.evaluate.best import find_best, format_best
from autoseg.evaluate.summary import evaluate_folder, format_summary_table

SUMMARY_FILE = "summary.json"


@cli.command("evaluate")
@click.option("--pred", "pred_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--ref", "ref_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-d", "--dataset", required=True, help="Dataset (its dataset.json gives labels and file ending).")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Normalized surface Dice tolerance in mm.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Summary file (default: PRED/{SUMMARY_FILE}).")
@click.option("--allow-missing", is_flag=True, help="Evaluate only the predicted cases.")
@click.option("-j", "--num-workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing summary.")
@click.pass_context
def evaluate_cmd(ctx: click.Context, pred_dir: Path, ref_dir: Path, dataset: str, tolerance: float,
                 output: Path | None, allow_missing: bool, num_workers: int, force: bool) -> None:
    """Dice, IoU, HD95 and surface Dice of predictions against reference labels."""
    paths = paths_from(ctx)
    meta = read_dataset_json(paths.raw_dataset(paths.resolve_dataset(dataset)))
    summary = evaluate_folder(pred_dir, ref_dir, LabelScheme.from_labels(meta["labels"]).labels,
                              meta["file_ending"], tolerance, num_workers, output, allow_missing, force=force)
    click.echo(format_summary_table(summary))
    click.echo(f"{len(summary.cases)} case(s); summary written to {output or pred_dir / SUMMARY_FILE}")


@cli.command("find-best", cls=multi_value_command("-c", "--configs"))
@click.argument("dataset")
@click.option("-c", "--configs", multiple=True, help="Configurations to compare (default: all with results).")
@click.option("--variant", default="default", show_default=True)
@click.option("--checkpoint", type=click.Choice(["final", "best", "latest"]), default="final", show_default=True,
              help="Checkpoint that `predict --best` will load.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Default: RESULTS/<dataset>/best.json.")
@click.option("--force", is_flag=True, help="Overwrite an existing best.json.")
@click.pass_context
def find_best_cmd(ctx: click.Context, dataset: str, configs: tuple[str, ...], variant: str, checkpoint: str,
                  output: Path | None, force: bool) -> None:
    """Pick the best configuration or ensemble and its postprocessing from cross-validation."""
    paths = paths_from(ctx)
    name = paths.resolve_dataset(dataset)
    best = find_best(paths, name, list(configs) or None, variant, checkpoint, output, force)
    click.echo(format_best(best))
    click.echo(f"written to {output or paths.results_dataset(name) / 'best.json'}")
