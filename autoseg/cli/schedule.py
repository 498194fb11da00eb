"""``autoseg train-all`` and ``autoseg status``: the parallel scheduler's commands."""

from __future__ import annotations

import os
import sys

import click

from autoseg.cli.app import TRACK_HELP, cli, paths_from, tracking_from
from autoseg.cli.planning import DEFAULT_GPU_MEMORY_GB, GreedyMultiOption
from autoseg.common.values import TRUE_WORDS
from autoseg.report.tables import format_duration, render_status, render_table
from autoseg.schedule.slurm import SlurmOptions
from autoseg.schedule.resources import parse_folds, parse_gpus
from autoseg.schedule.graph import TrainAllRequest
from autoseg.schedule.jobs import JobKind, JobSpec
from autoseg.schedule.order import Assignment
from autoseg.schedule.status import collect_status, latest_run
from autoseg.schedule.train_all import TrainAllOptions, observer_rows, preview, train_all

EXIT_JOBS_FAILED = 1
EXIT_INTERRUPTED = 130
FAKE_GPUS_ENV = "AUTOSEG_FAKE_GPUS"
"""``AUTOSEG_FAKE_GPUS=1``: take ``--gpus`` as given without CUDA (tests, rehearsing a GPU schedule)."""


def fake_gpus_from_env() -> bool:
    """Whether ``$AUTOSEG_FAKE_GPUS`` says the ``--gpus`` ids are stand-ins (1/true/yes/on)."""
    return os.environ.get(FAKE_GPUS_ENV, "").strip().lower() in TRUE_WORDS


class LiveTable:
    """Redraws the running jobs in place on a terminal; silent when stderr is not a terminal."""

    def __init__(self, paths, enabled: bool) -> None:  # type: ignore[no-untyped-def]
        self.paths, self.enabled, self.lines = paths, enabled and sys.stderr.isatty(), 0

    def __call__(self, rows) -> None:  # type: ignore[no-untyped-def]
        if not self.enabled:
            return
        shown = [r for r in rows if r.state.value in ("running", "failed", "interrupted")]
        counts = ", ".join(f"{sum(r.state is s for r in rows)} {s.value}" for s in {r.state: 0 for r in rows})
        text = render_status(observer_rows(self.paths, shown), log_width=40) if shown else ""
        text = f"{text}\n{counts}" if text else counts
        sys.stderr.write((f"\x1b[{self.lines}F\x1b[J" if self.lines else "") + text + "\n")
        self.lines = text.count("\n") + 1


DRY_RUN_HEADERS = ("job", "GPU", "CPUs", "workers", "augment", "start", "after")


def render_dry_run(jobs: list[JobSpec], placed: list[Assignment] | None) -> str:
    """The ``--dry-run`` table: each job's GPU, CPU share, data workers, augmentation device and
    estimated start (local runs), plus what the plan jobs plan for."""
    where = {a.job_id: a for a in placed or []}
    rows = []
    for j in jobs:
        a = where.get(j.job_id)
        cells = [a.gpu, a.cpus, a.workers, a.augment_device, format_duration(a.start_s)] if a else [None] * 5
        rows.append([j.job_id, *cells, ", ".join(j.depends_on) or None])
    lines = [render_table(DRY_RUN_HEADERS, rows, max_width={len(DRY_RUN_HEADERS) - 1: 60})]
    if placed:
        lines.append("CPU shares are decided as jobs start: the first wave (start 0s) gets these; later ones "
                     "get the cores free when they start (estimated here)")
    for j in jobs:
        if j.kind is JobKind.PLAN:
            memory = (f"{j.resources.gpu_memory_gb:g} GB of GPU memory" if j.resources.gpu_memory_gb else
                      f"{DEFAULT_GPU_MEMORY_GB:g} GB of GPU memory (autoseg plan's default: no --gpu-memory, no GPU "
                      "to ask)")
            lines.append(f"{j.job_id} plans for {memory}")
    return "\n".join(lines)


@cli.command("train-all")
@click.argument("datasets", nargs=-1)
@click.option("--configs", cls=GreedyMultiOption, multiple=True, metavar="NAME...",
              help="Configurations (default: every planned one; 2d 3d_fullres before planning).")
@click.option("--folds", default="0-4", show_default=True, help="0-4, 0,1,2 or all (train on every case).")
@click.option("--gpus", default=None, help="GPU ids, e.g. 0,1,2,3 (default: every visible CUDA device).")
@click.option("--jobs-per-gpu", type=click.IntRange(min=1), default=None, help="Pack N jobs per GPU.")
@click.option("--gpu-memory", type=float, default=None, metavar="GB", help="GPU memory for planning and packing.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="TrainerConfig override for every training.")
@click.option("--variant", default="default", show_default=True,
              help="Results sub-folder of every training (train with a changed --set next to the old results).")
@click.option("--plans", default="default", show_default=True, metavar="PRESET",
              help="Planner preset (resenc-m, resenc-l, resenc-xl): plans it if needed, trains its "
                   "<preset>__CONFIG folders.")
@click.option("--retries", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True)
@click.option("--slurm-partition", default=None)
@click.option("--slurm-time", type=click.IntRange(min=1), default=24 * 60, show_default=True, metavar="MIN")
@click.option("--slurm-mem", type=float, default=None, metavar="GB")
@click.option("--slurm-cpus", type=click.IntRange(min=1), default=8, show_default=True, help="CPUs per Slurm job.")
@click.option("--dry-run", is_flag=True,
              help="Print the job graph: each job's GPU, CPU cores, data workers and augmentation device.")
@click.option("-j", "--cpu-slots", type=click.IntRange(min=1), default=1, show_default=True,
              help="Concurrent CPU-only jobs (plan, preprocess, find-best).")
@click.option("--track", default=None, metavar="BACKEND[:TARGET]",
              help="An experiment (MLflow) / group (W&B) per dataset. " + TRACK_HELP)
@click.option("--quiet", is_flag=True, help="No live table.")
@click.pass_context
def train_all_cmd(ctx: click.Context, datasets: tuple[str, ...], configs: tuple[str, ...], folds: str,
                  gpus: str | None, jobs_per_gpu: int | None, gpu_memory: float | None, overrides: tuple[str, ...],
                  variant: str, plans: str, retries: int, executor: str, slurm_partition: str | None, slurm_time: int,
                  slurm_mem: float | None, slurm_cpus: int, dry_run: bool, cpu_slots: int, track: str | None,
                  quiet: bool) -> None:
    """Plan, preprocess and train every DATASET x config x fold in parallel, one job per GPU; resumable."""
    paths = paths_from(ctx)
    tracking = tracking_from(track)
    request = TrainAllRequest(datasets=datasets, configs=configs, folds=parse_folds(folds),
                              trainer_overrides=overrides, gpu_memory_gb=gpu_memory, variant=variant, plans=plans)
    options = TrainAllOptions(request=request, gpus=parse_gpus(gpus) if gpus is not None else None,
                              jobs_per_gpu=jobs_per_gpu, cpu_slots=cpu_slots, retries=retries, executor=executor,
                              slurm=SlurmOptions(slurm_partition, slurm_time, slurm_mem), slurm_cpus_per_job=slurm_cpus,
                              fake_gpus=fake_gpus_from_env(), track=tracking.spec if tracking else None)
    if dry_run:
        click.echo(render_dry_run(*preview(paths, options)))
        return
    summary = train_all(paths, options, observer=LiveTable(paths, not quiet))
    click.echo(summary.one_line(), err=not summary.ok)
    if not summary.ok:
        ctx.exit(EXIT_INTERRUPTED if summary.interrupted else EXIT_JOBS_FAILED)


@cli.command("status")
@click.option("--all", "all_runs", is_flag=True,
              help="Jobs of every train-all/sweep run under this results root, not only the latest run's.")
@click.pass_context
def status_cmd(ctx: click.Context, all_runs: bool) -> None:
    """The latest run's jobs: state, GPU, epoch/total, ETA, last pseudo-Dice, log (works while train-all runs)."""
    statuses = collect_status(paths_from(ctx))
    if all_runs:
        click.echo(render_status(statuses, show_runs=True))
        return
    shown, hidden = latest_run(statuses)
    click.echo(render_status(shown, hidden=hidden))
