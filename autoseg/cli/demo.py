"""`autoseg demo`: the whole pipeline on the generated phantom dataset (the README's main command)."""

from __future__ import annotations

from pathlib import Path

import click

from autoseg.cli.app import cli
from autoseg.demo import DEMO_TRAINER_OVERRIDES, DemoOptions, run_demo
from autoseg.evaluate.summary import format_summary_table


@cli.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("autoseg_demo"),
              show_default=True, help="Where the phantom's raw/preprocessed/results folders go.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help=f"Trainer overrides on top of the demo schedule ({' '.join(DEMO_TRAINER_OVERRIDES)}).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("-j", "--num-workers", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Processes for preprocessing and data-augmentation workers.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(workdir: Path, overrides: tuple[str, ...], device: str, num_workers: int, quiet: bool) -> None:
    """Generate a phantom dataset, plan, preprocess, train briefly, predict held-out cases, evaluate."""
    result = run_demo(DemoOptions(workdir=workdir, trainer_overrides=DEMO_TRAINER_OVERRIDES + overrides,
                                  device=device, num_workers=num_workers, show_progress=not quiet))
    click.echo(f"\nheld-out evaluation ({len(result.summary.cases)} cases, "
               f"{result.predictions}):")
    click.echo(format_summary_table(result.summary))
    click.echo(f"training: {result.train.fold_dir} (progress.png, training_log.jsonl)")
