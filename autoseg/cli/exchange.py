"""Model exchange: `autoseg export-model`, `install-model`, `import-nnunet` and `export-nnunet`."""

from __future__ import annotations

from pathlib import Path

import click

from autoseg.cli.app import cli, paths_from
from autoseg.cli.predict import multi_value_command, parse_fold
from autoseg.common.sizes import parse_size
from autoseg.infer.exchange import export_model, install_model
from autoseg.infer.nnunet_export import export_nnunet
from autoseg.infer.nnunet_import import import_nnunet
from autoseg.infer.unpack_limits import UnpackLimits


@cli.command("export-model", cls=multi_value_command("-c", "--configs", "-f", "--folds"))
@click.argument("dataset")
@click.option("-c", "--configs", multiple=True, required=True, help="Configuration(s) to export.")
@click.option("-f", "--folds", multiple=True, default=("0", "1", "2", "3", "4"), show_default=True,
              help="Folds to export (e.g. -f 0 1 2 3 4).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="model.zip")
@click.option("--variant", default="default", show_default=True, help="Training variant folder.")
@click.option("--plans", default="default", show_default=True, metavar="PRESET",
              help="Plans preset the folds were trained with (resenc-m, resenc-l, resenc-xl); or name it per "
                   "configuration, -c resenc-l__3d_fullres.")
@click.option("--checkpoint", type=click.Choice(("final", "best")), default="final", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing zip.")
@click.pass_context
def export_model_cmd(ctx: click.Context, dataset: str, configs: tuple[str, ...], folds: tuple[str, ...],
                     output: Path, variant: str, plans: str, checkpoint: str, force: bool) -> None:
    """Zip trained folds (weights only), plans, dataset.json and find-best's choice, with a manifest."""
    paths = paths_from(ctx)
    m = export_model(paths, paths.resolve_dataset(dataset), configs, [parse_fold(f) for f in folds], output,
                     variant=variant, checkpoint=checkpoint, force=force, plans=plans)
    best = ", best.json" if m.has_best else ""
    click.echo(f"wrote {output}: {m.dataset} {' + '.join(m.configs)} folds {', '.join(map(str, m.folds))} "
               f"({checkpoint}{best}; {len(m.files)} files, {output.stat().st_size / 1e6:.1f} MB)")


@cli.command("install-model")
@click.argument("zip_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace a model installed before (never a folder of training results).")
@click.option("--max-size", default="4GiB", show_default=True, metavar="SIZE",
              help="Refuse a zip that unpacks to more than this (8GB, 500MiB, ...).")
@click.option("--allow-high-ratio", is_flag=True,
              help="Accept members that expand more than 100x (the mark of a zip bomb).")
@click.pass_context
def install_model_cmd(ctx: click.Context, zip_file: Path, force: bool, max_size: str, allow_high_ratio: bool) -> None:
    """Verify a model zip against its manifest and install it into the results root.

    Before writing anything it refuses a zip whose declared sizes exceed --max-size or the free
    space of the results root, or that holds a member expanding absurdly (a zip bomb).
    """

    limits = UnpackLimits(max_size=parse_size(max_size), allow_high_ratio=allow_high_ratio)
    m, target = install_model(paths_from(ctx), zip_file, force=force, limits=limits)
    click.echo(f"installed {m.dataset} ({' + '.join(m.configs)}, folds {', '.join(map(str, m.folds))}) -> {target}")


@cli.command("import-nnunet", cls=multi_value_command("-f", "--folds"))
@click.argument("results_folders", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-f", "--folds", multiple=True, help="Folds to import (default: every fold_<k> with the checkpoint).")
@click.option("--checkpoint", type=click.Choice(("final", "best")), default="final", show_default=True,
              help="checkpoint_final.pth or checkpoint_best.pth of each fold.")
@click.option("--force", is_flag=True, help="Replace a configuration imported before.")
@click.pass_context
def import_nnunet_cmd(ctx: click.Context, results_folders: tuple[Path, ...], folds: tuple[str, ...], checkpoint: str,
                      force: bool) -> None:
    """Turn nnU-Net v2 trainer folders (<Trainer>__<Plans>__<config>) into an autoseg model folder.

    The weights are read without running code; predict with `autoseg predict -m RESULTS/<dataset>`.
    """
    paths = paths_from(ctx)
    for folder in results_folders:
        r = import_nnunet(paths, folder, [parse_fold(f) for f in folds] or None, checkpoint, force)
        for note in r.notes:
            click.echo(f"note: {note}")
        pp = ", postprocessing -> best.json" if r.has_postprocessing else ""
        click.echo(f"imported {r.dataset} {r.config_dirname} folds {', '.join(map(str, r.folds))} ({checkpoint}{pp})"
                   f" -> {r.model_folder}")


@cli.command("export-nnunet", cls=multi_value_command("-c", "--configs", "-f", "--folds"))
@click.argument("dataset")
@click.option("-c", "--configs", multiple=True, required=True, help="Configuration(s) to export.")
@click.option("-f", "--folds", multiple=True, help="Folds (default: every fold with the checkpoint).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="An nnUNet_results root: OUT/<dataset>/nnUNetTrainer__<Plans>__<config>/ is written.")
@click.option("--variant", default="default", show_default=True, help="Training variant folder.")
@click.option("--plans", default="default", show_default=True, metavar="PRESET",
              help="Plans preset the folds were trained with (or name it per configuration, -c resenc-l__3d_fullres).")
@click.option("--checkpoint", type=click.Choice(("final", "best")), default="final", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing trainer folder.")
@click.pass_context
def export_nnunet_cmd(ctx: click.Context, dataset: str, configs: tuple[str, ...], folds: tuple[str, ...],
                      output: Path, variant: str, plans: str, checkpoint: str, force: bool) -> None:
    """Write trained folds as an nnU-Net v2 results folder that nnUNetv2_predict loads."""
    paths = paths_from(ctx)
    r = export_nnunet(paths, paths.resolve_dataset(dataset), configs, output, [parse_fold(f) for f in folds],
                      variant=variant, checkpoint=checkpoint, plans=plans, force=force)
    for note in r.notes:
        click.echo(f"note: {note}")
    for d in r.trainer_dirs:
        click.echo(f"wrote {d} (folds {', '.join(map(str, r.folds))}, {checkpoint})")
