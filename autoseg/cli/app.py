"""The click group, the shared options and the one place user errors become one-line messages.

Each command module (``autoseg/cli/<stage>.py``) registers its commands on `cli`; commands
parse options, build `Paths` via `paths_from(ctx)`, call one API function and render.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

from autoseg.common.errors import AutosegError, ConfigErrors, DatasetErrors
from autoseg.common.jsonio import disk_full_cause
from autoseg.common.paths import Paths
from autoseg.track.base import require_backend
from autoseg.track.spec import TrackRequest, track_request_from_env

EXIT_USER_ERROR = 2
"""Exit status for problems the user can fix (bad files, options); click uses 2 for usage too."""


@dataclass(frozen=True)
class CliContext:
    """What every command gets through ``ctx.obj``."""

    paths: Paths
    verbose: bool


class AutosegGroup(click.Group):
    """A group that turns `AutosegError` and a full disk into one line per problem and exit status 2.

    Doing this in the group (not only in `main`) means click's CliRunner sees exactly what a
    user sees, so CLI tests check the real messages and exit codes.
    """

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except AutosegError as e:
            print_error(e)
            ctx.exit(EXIT_USER_ERROR)
        except EOFError as e:
            # click reads an EOFError as Ctrl-D and prints only "Aborted!"; here it can only come
            # from a file that ends early (click's own prompts turn Ctrl-D into click.Abort)
            click.echo(f"error: a file ended before its end-of-data marker ({e or 'EOFError'})", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            full = disk_full_cause(e)
            if full is None:
                raise
            print_disk_full(full, ctx)
            ctx.exit(EXIT_USER_ERROR)


@click.group(cls=AutosegGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--raw", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Raw datasets root (default: $AUTOSEG_RAW, $nnUNet_raw, ./datasets/raw).")
@click.option("--preprocessed", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Preprocessed root (default: $AUTOSEG_PREPROCESSED, $nnUNet_preprocessed, ./datasets/preprocessed).")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results root (default: $AUTOSEG_RESULTS, $nnUNet_results, ./datasets/results).")
@click.option("-v", "--verbose", is_flag=True, help="Log more (debug level).")
@click.version_option(package_name="autoseg")
@click.pass_context
def cli(ctx: click.Context, raw: Path | None, preprocessed: Path | None, results: Path | None,
        verbose: bool) -> None:
    """autoseg: self-configuring medical image segmentation, trained in parallel."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    paths = Paths.from_env(os.environ, {"raw": raw, "preprocessed": preprocessed, "results": results})
    ctx.obj = CliContext(paths=paths, verbose=verbose)


def paths_from(ctx: click.Context) -> Paths:
    """The `Paths` built by the group callback."""
    return ctx.find_object(CliContext).paths


def tracking_from(option: str | None, checkpoints: bool = False, file_value: str | None = None) -> TrackRequest | None:
    """``--track`` (or a sweep file's ``track:``, or $AUTOSEG_TRACK) resolved here, its package checked now."""
    request = track_request_from_env(os.environ, option, Path.cwd(), file_value)
    if request is None:
        return None
    require_backend(request.spec)
    if checkpoints:
        request = dataclasses.replace(request, spec=dataclasses.replace(request.spec, checkpoints=True))
    return request


TRACK_HELP = ("Log every training to mlflow, tensorboard or wandb (default: $AUTOSEG_TRACK; none: off), e.g. "
              "mlflow:http://127.0.0.1:5000; docs/tracking.md.")


def print_error(err: AutosegError) -> None:
    """One line per problem, ``error: <where>: <problem>``, on stderr."""
    problems = err.errors if isinstance(err, DatasetErrors | ConfigErrors) else [err]
    for p in problems:
        click.echo(f"error: {p}", err=True)


def disk_full_message(err: OSError, ctx: click.Context | None = None) -> str:
    """``<file>: no space left on device (disk full); free space and rerun ...`` for an ENOSPC/EDQUOT error.

    A full disk is the user's to fix, and any write can hit it (a checkpoint, a log line, the
    scheduler's state), so it is one line, not the writer's traceback. Without a file name (a
    stream write) the fullest of the data roots is named.
    """
    where = err.filename or _fullest_root(ctx)
    what = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on device"
    command = ctx.invoked_subcommand if ctx is not None else None
    hint = "free space and rerun with --continue" if command == "train" else "free space and run the same command again"
    return f"{where}: {what} (disk full); {hint}"


def print_disk_full(err: OSError, ctx: click.Context | None = None) -> None:
    """The one-line disk-full error on stderr; when stderr itself is on the full disk, nothing more to do."""
    try:
        click.echo(f"error: {disk_full_message(err, ctx)}", err=True)
    except OSError:
        pass


def _fullest_root(ctx: click.Context | None) -> str:
    obj = ctx.find_object(CliContext) if ctx is not None else None
    roots = [obj.paths.results, obj.paths.preprocessed, obj.paths.raw] if obj is not None else []
    free = {}
    for root in [*roots, Path(tempfile.gettempdir()), Path.cwd()]:
        with contextlib.suppress(OSError):
            free[str(root)] = shutil.disk_usage(root).free
    return min(free, key=free.__getitem__) if free else "<unknown>"


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``autoseg`` and ``python -m autoseg``)."""
    try:
        cli.main(args=argv, prog_name="autoseg", standalone_mode=True)
    except AutosegError as e:  # raised outside a command (e.g. while building Paths)
        print_error(e)
        sys.exit(EXIT_USER_ERROR)
