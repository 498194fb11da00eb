"""``autoseg sweep FILE`` (run an ablation grid through the scheduler) and ``autoseg sweep-report FILE``."""

from __future__ import annotations

from pathlib import Path

import click

from autoseg.cli.app import TRACK_HELP, cli, paths_from, tracking_from
from autoseg.cli.schedule import EXIT_INTERRUPTED, EXIT_JOBS_FAILED, LiveTable, fake_gpus_from_env
from autoseg.report.sweep_report import build_sweep_report, format_markdown, write_sweep_report
from autoseg.report.sweep_tracking import build_sweep_report_from_tracker, finish_sweep_tracking
from autoseg.schedule.resources import PoolConfig, parse_gpus
from autoseg.schedule.order import simulate_schedule
from autoseg.schedule.runner import RunOptions
from autoseg.schedule.sweep import SweepSpec, load_sweep
from autoseg.schedule.sweep.jobs import SweepJobs, build_sweep_jobs, sweep_dir
from autoseg.schedule.sweep.run import run_sweep
from autoseg.schedule.train_all import TrainAllOptions, make_executor, pool_config


def _run_options(gpus: str | None, jobs_per_gpu: int | None, executor: str, retries: int) -> TrainAllOptions:
    """The scheduler's own "how to run" options (GPU detection, packing, executors), as train-all uses them."""
    return TrainAllOptions(gpus=parse_gpus(gpus) if gpus is not None else None, jobs_per_gpu=jobs_per_gpu,
                           retries=retries, executor=executor, fake_gpus=fake_gpus_from_env())


def _render_plan(spec: SweepSpec, jobs: SweepJobs, options: TrainAllOptions) -> None:
    trains = len(jobs.train_jobs)
    click.echo(f"sweep {spec.name}: {len(spec.variants)} variants x {len(spec.seeds)} seed(s) x "
               f"{len(spec.folds)} fold(s) x {len(spec.configs)} config(s) x {len(spec.datasets)} dataset(s) "
               f"= {trains} trainings, {len(jobs.jobs) - trains} plan/preprocess job(s); baseline: {spec.baseline.name}")
    width = max(len(j.job_id) for j in jobs.jobs)
    if options.executor != "local":  # Slurm places jobs itself
        click.echo("\n".join(j.job_id for j in jobs.jobs))
        return
    click.echo(f"{'job':<{width}}  {'gpu':>4}  {'cpus':>4}  {'start (est.)':>12}")
    for a in simulate_schedule(list(jobs.jobs), pool_config(options)):
        click.echo(f"{a.job_id:<{width}}  {a.gpu or '-':>4}  {a.cpus:>4}  {_hours(a.start_s):>12}")
    for ds in jobs.unplanned:
        click.echo(f"note: {ds} is not planned yet; derived plans are made after its plan job")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


@cli.command("sweep")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--gpus", default=None, help="GPU ids, e.g. 0,1,2,3 (default: every visible CUDA device).")
@click.option("--jobs-per-gpu", type=click.IntRange(min=1), default=None,
              help="Trainings sharing one GPU (default: by the plan's memory estimate, else 1).")
@click.option("--executor", "executor_name", type=click.Choice(["local", "slurm"]), default="local",
              show_default=True, help="Run jobs as local processes or as Slurm jobs.")
@click.option("--retries", type=click.IntRange(min=0), default=1, show_default=True,
              help="Retries per failed job.")
@click.option("--dry-run", is_flag=True, help="Validate and print the jobs and their GPU slots; run nothing.")
@click.option("--track", default=None, metavar="BACKEND[:TARGET]",
              help="The sweep as one parent run with a child per variant (beats the file's track:). " + TRACK_HELP)
@click.pass_context
def sweep_command(ctx: click.Context, file: Path, gpus: str | None, jobs_per_gpu: int | None,
                  executor_name: str, retries: int, dry_run: bool, track: str | None) -> None:
    """Run an ablation sweep FILE (YAML): variants x seeds x folds through the scheduler."""
    paths = paths_from(ctx)
    opts = _run_options(gpus, jobs_per_gpu, executor_name, retries)  # bad --gpus: refused before the file is read
    spec = load_sweep(file, paths)
    tracking = tracking_from(track, file_value=spec.track or None)
    if dry_run:
        _render_plan(spec, build_sweep_jobs(spec, paths, write_plans=False), opts)
        return
    run_options = RunOptions(retries=retries, pool=pool_config(opts) if executor_name == "local" else PoolConfig(),
                             cpus_per_job=opts.slurm_cpus_per_job, observer=LiveTable(paths, True))
    run = run_sweep(spec, paths, make_executor(opts), run_options, tracking.spec if tracking else None)
    for summary in run.summaries:
        click.echo(summary.one_line(), err=not summary.ok)
    report = build_sweep_report(run.spec, paths)
    files = write_sweep_report(report, sweep_dir(paths, spec.name))
    finish_sweep_tracking(run, report, files)
    click.echo(format_markdown(report))
    click.echo(f"written: {files.markdown}, {files.csv}, {files.png}")
    if not run.ok:
        ctx.exit(EXIT_INTERRUPTED if run.summaries[-1].interrupted else EXIT_JOBS_FAILED)


@cli.command("sweep-report")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from-tracker", is_flag=True,
              help="Read the runs from the sweep's MLflow runs instead of the fold folders (same table).")
@click.option("--track", default=None, metavar="mlflow[:URI]",
              help="The tracker to read when the sweep's tracking.json is not here (default: $AUTOSEG_TRACK).")
@click.pass_context
def sweep_report_command(ctx: click.Context, file: Path, from_tracker: bool, track: str | None) -> None:
    """Write report.md / report.csv / report.png of sweep FILE (finished runs; lists the missing)."""
    paths = paths_from(ctx)
    spec = load_sweep(file, paths)
    if from_tracker:
        tracking = tracking_from(track, file_value=spec.track or None)
        report = build_sweep_report_from_tracker(spec, paths, tracking.spec if tracking else None)
    else:
        report = build_sweep_report(spec, paths)
    files = write_sweep_report(report, sweep_dir(paths, spec.name))
    click.echo(format_markdown(report))
    click.echo(f"written: {files.markdown}, {files.csv}, {files.png}")
