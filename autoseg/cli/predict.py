"""Inference commands: `autoseg predict` and `autoseg export-onnx`."""

from __future__ import annotations

from pathlib import Path

import click

from autoseg.cli.app import cli, paths_from
from autoseg.common.errors import AutosegError
from autoseg.evaluate.best import predict_with_best
from autoseg.infer.exchange import select_from_model_folder
from autoseg.infer.onnx_export import export_onnx
from autoseg.infer.lean import parse_memory
from autoseg.infer.compiled import COMPILE_MODES
from autoseg.infer.predict import PredictOptions, PredictRequest, run_prediction

CHECKPOINT_CHOICES = ("final", "best", "latest")
"""Same as `autoseg.infer.predict.CHECKPOINT_CHOICES`; repeated so `autoseg --help` need not import torch."""


def multi_value_command(*option_names: str) -> type[click.Command]:
    """A Command class where ``-f 0 1 2`` means ``-f 0 -f 1 -f 2`` for the named options.

    click options take a fixed number of values; nnU-Net users type folds and configurations
    space-separated, so argv is rewritten before click parses it (values run until the next
    token that starts with '-').
    """
    names = set(option_names)

    class MultiValueCommand(click.Command):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            out, current = [], None
            for tok in args:
                if tok in names:
                    current = tok
                    continue
                if current is not None and not tok.startswith("-"):
                    out += [current, tok]
                    continue
                current = None
                out.append(tok)
            return super().parse_args(ctx, out)

    return MultiValueCommand


def parse_fold(text: str) -> int | str:
    """A fold is an integer or 'all'."""
    if text == "all":
        return text
    if not text.isdigit():
        raise AutosegError(f"fold must be an integer or 'all', got {text!r}", "-f")
    return int(text)


@cli.command("predict", cls=multi_value_command("-f", "--folds", "-c", "--configs"))
@click.option("-d", "--dataset", default=None, help="Dataset name or id (not needed with --best or -m).")
@click.option("-m", "--model", "model_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A model folder (installed, or an unzipped export-model): no raw or preprocessed data needed; "
                   "its best.json and postprocessing apply unless -c/-f are given.")
@click.option("-c", "--configs", multiple=True, help="Configuration(s); several = ensemble.  [default: 3d_fullres]")
@click.option("-f", "--folds", multiple=True, help="Folds to average (e.g. -f 0 1 2 3 4).  [default: 0 1 2 3 4]")
@click.option("-i", "--input", "input_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of CASE_XXXX<ending> images.")
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--best", "best_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="best.json from `autoseg find-best` (configs, folds, postprocessing).")
@click.option("--variant", default="default", show_default=True, help="Training variant folder.")
@click.option("--plans", default="default", show_default=True, metavar="PRESET",
              help="Plans preset the folds were trained with (resenc-m, resenc-l, resenc-xl); or name it per "
                   "configuration, -c resenc-l__3d_fullres.")
@click.option("--checkpoint", type=click.Choice(CHECKPOINT_CHOICES), default="final", show_default=True)
@click.option("--step", type=click.FloatRange(0.05, 1.0), default=0.5, show_default=True,
              help="Window step as a fraction of the patch.")
@click.option("--no-tta", is_flag=True, help="Skip mirroring test-time augmentation (faster).")
@click.option("--save-probabilities", is_flag=True, help="Also write CASE.npz + CASE.json (for ensembling).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True,
              help="Windows per forward pass.")
@click.option("-j", "--num-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads preparing upcoming cases while the network runs.")
@click.option("--force", is_flag=True, help="Predict cases that already have an output.")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Most memory one case may take (e.g. 8GB, 500MiB): picks the slab size; a limit that cannot "
                   "be met stops before the network runs. --save-probabilities and ensembles of configurations "
                   "keep whole volumes and may need more (they say so).")
@click.option("--prev-stage-predictions", "prev_stage_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="3d_cascade_fullres: existing 3d_lowres predictions (CASE<ending>) instead of "
                                 "predicting them first.")
@click.option("--compile", "compile_mode", type=click.Choice(COMPILE_MODES), default="auto", show_default=True,
              help="torch.compile the networks: auto = on the CPU once a network has run 60 s (long runs get "
                   "~25 % faster forwards after a 15-50 CPU-s compilation); on; off.")
@click.option("--nnunet-fp16", is_flag=True,
              help="Reproduce nnUNetv2_predict's float16 accumulation bit for bit where possible (to match masks "
                   "made with nnU-Net); slower and less exact than the default float32.")
@click.pass_context
def predict_cmd(ctx: click.Context, dataset: str | None, model_dir: Path | None, configs: tuple[str, ...],
                folds: tuple[str, ...], input_dir: Path, output_dir: Path, best_file: Path | None, variant: str,
                plans: str, checkpoint: str,
                step: float, no_tta: bool, save_probabilities: bool, device: str, batch_size: int,
                num_workers: int, force: bool, memory_limit: str | None, prev_stage_dir: Path | None,
                compile_mode: str, nnunet_fp16: bool) -> None:
    """Segment every case of a folder with trained folds (written in each input's own geometry)."""
    paths = paths_from(ctx)

    options = PredictOptions(step=step, tta=not no_tta, batch_size=batch_size,
                             memory_limit=parse_memory(memory_limit), compile=compile_mode, nnunet_fp16=nnunet_fp16)
    if model_dir is not None:
        unset = click.core.ParameterSource.DEFAULT  # then the model's manifest decides
        chosen = select_from_model_folder(
            paths, model_dir, dataset, configs, tuple(parse_fold(f) for f in folds),
            None if ctx.get_parameter_source("variant") == unset else variant,
            None if ctx.get_parameter_source("checkpoint") == unset else checkpoint, best_file)
        paths, dataset, variant, checkpoint, best_file = (chosen.paths, chosen.dataset, chosen.variant,
                                                          chosen.checkpoint, chosen.best_file)
        configs, folds = chosen.configs, tuple(str(f) for f in chosen.folds)
    if best_file is not None:
        result = predict_with_best(paths, best_file, input_dir, output_dir, device, save_probabilities, force,
                                   options, dataset=paths.resolve_dataset(dataset) if dataset else None,
                                   num_workers=num_workers, prev_stage_dir=prev_stage_dir)
    else:
        if dataset is None:
            raise AutosegError("give -d DATASET (or --best FILE)", "-d")
        request = PredictRequest(paths.resolve_dataset(dataset), configs or ("3d_fullres",),
                                 tuple(parse_fold(f) for f in folds) or (0, 1, 2, 3, 4), input_dir, output_dir,
                                 variant, checkpoint, device, save_probabilities, force, options, num_workers,
                                 prev_stage_dir, plans)
        result = run_prediction(paths, request)
    skipped = f", skipped {len(result.skipped)} already predicted (--force to redo)" if result.skipped else ""
    click.echo(f"predicted {len(result.written)} case(s){skipped} -> {result.output_dir}")


@cli.command("export-onnx")
@click.option("-d", "--dataset", required=True, help="Dataset name or id.")
@click.option("-c", "--config", required=True, help="Configuration.")
@click.option("-f", "--fold", required=True, help="Fold (an integer or 'all').")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="model.onnx")
@click.option("--variant", default="default", show_default=True)
@click.option("--plans", default="default", show_default=True, metavar="PRESET",
              help="Plans preset the fold was trained with (resenc-m, resenc-l, resenc-xl).")
@click.option("--checkpoint", type=click.Choice(CHECKPOINT_CHOICES), default="final", show_default=True)
@click.option("--opset", type=click.IntRange(11, 23), default=17, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.pass_context
def export_onnx_cmd(ctx: click.Context, dataset: str, config: str, fold: str, output: Path, variant: str,
                    plans: str, checkpoint: str, opset: int, force: bool) -> None:
    """Export one fold's network to ONNX, checked against torch with onnxruntime."""
    paths = paths_from(ctx)
    rec = export_onnx(paths, paths.resolve_dataset(dataset), config, parse_fold(fold), output, variant=variant,
                      checkpoint=checkpoint, opset=opset, force=force, plans=plans)
    click.echo(f"wrote {output} (opset {rec.opset}, input {list(rec.input_shape)}, "
               f"max |onnxruntime - torch| = {rec.max_abs_diff:.2g}) and {output.with_suffix('.json')}")
