"""Dataset commands: `autoseg convert-msd` and `autoseg verify`."""

from __future__ import annotations

from pathlib import Path

import click

from autoseg.cli.app import cli, paths_from
from autoseg.dataset.convert_msd import convert_msd
from autoseg.dataset.spec import load_dataset
from autoseg.dataset.verify import verify_dataset


@cli.command("convert-msd")
@click.argument("task_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--id", "dataset_id", type=click.IntRange(1, 999), required=True,
              help="Dataset id for DatasetXXX_Name (1-999).")
@click.option("--name", default=None, help="Dataset name (default: the MSD 'name' field).")
@click.option("--force", is_flag=True, help="Replace an existing dataset of the same name.")
@click.option("-j", "--num-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parallel processes.")
@click.pass_context
def convert_msd_cmd(ctx: click.Context, task_dir: Path, dataset_id: int, name: str | None, force: bool,
                    num_workers: int) -> None:
    """Convert a Medical Segmentation Decathlon task folder into an nnU-Net v2 raw dataset."""
    out = convert_msd(task_dir, paths_from(ctx).raw, dataset_id, name=name, force=force,
                      num_workers=num_workers)
    spec = load_dataset(out)
    click.echo(f"{out}: {len(spec.cases)} training case(s), {len(spec.test_cases)} test case(s)")


@cli.command("verify")
@click.argument("dataset")
@click.option("-j", "--num-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parallel processes.")
@click.pass_context
def verify_cmd(ctx: click.Context, dataset: str, num_workers: int) -> None:
    """Read every image and label of a raw dataset and report every problem (DATASET: name or id)."""
    paths = paths_from(ctx)
    spec = verify_dataset(paths.raw_dataset(paths.resolve_dataset(dataset)), num_workers=num_workers)
    channels = ", ".join(spec.channel_names.values())
    if spec.label_scheme.has_regions:
        labels = ", ".join(f"{k}={list(v)}" for k, v in spec.label_scheme.foreground.items())
        what = f"{spec.num_classes} regions ({labels}; regions_class_order {list(spec.regions_class_order)})"
    else:
        labels = ", ".join(f"{v}={k}" for k, v in sorted(spec.labels.items(), key=lambda kv: kv[1]))
        what = f"{spec.num_classes} labels ({labels})"
    click.echo(f"OK {spec.name}: {len(spec.cases)} training case(s), {len(spec.test_cases)} test case(s), "
               f"{spec.num_channels} channel(s) ({channels}), {what}")
