"""The ``train-all`` job graph: per dataset plan -> preprocess -> train per configuration x fold
(-> validate) -> find-best, leaving out what is already done, plus training-time estimates.

Pure graph building over what is on disk; `autoseg.schedule.runner.run_jobs` runs the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from autoseg.common.errors import AutosegError, DatasetError
from autoseg.common.jsonio import load_record
from autoseg.common.paths import DEFAULT_PLANS, Paths, is_folder_name
from autoseg.dataset.spec import load_dataset
from autoseg.planning.store import load_plan
from autoseg.planning.presets import get_preset
from autoseg.preprocess import list_preprocessed_cases
from autoseg.schedule.jobs import (CASCADE_FOLDS, JobKind, JobSpec, Resources, link_cascades, previous_stage_of,
                                   qualified_config)
from autoseg.splits import DEFAULT_N_FOLDS, load_splits, user_splits_file
from autoseg.train.checkpoint import FINAL
from autoseg.train.config import TrainerConfig, apply_overrides, changed_keys, format_changes
from autoseg.pipeline.folds import TRAINER_CONFIG_FILE
from autoseg.pipeline.run import RESUME_MAY_CHANGE
from autoseg.pipeline.validate import validation_complete

log = logging.getLogger(__name__)

DEFAULT_CONFIGS_UNPLANNED = ("2d", "3d_fullres")
"""Configurations trained when a dataset is not planned yet and none are named (3d_lowres exists
only for large images, which is unknown before planning)."""

REFERENCE_VOXELS_PER_S = 6e6
"""Rough training throughput (patch voxels x batch per second) used only to order jobs longest-first."""

def estimate_train_seconds(patch_size: tuple[int, ...], batch_size: int, cfg: TrainerConfig) -> float:
    """Estimated training time from the plan and the trainer config: patch voxels x batch x steps / throughput.

    ``cfg.batch_size`` (when set) replaces the plan's ``batch_size``; steps are epochs x (train +
    validation iterations), all from the job's parsed `TrainerConfig`.
    """
    voxels = 1.0
    for s in patch_size:
        voxels *= s
    batch = cfg.batch_size if cfg.batch_size is not None else batch_size
    steps = cfg.epochs * (cfg.iterations_per_epoch + cfg.val_iterations)
    return voxels * batch * steps / REFERENCE_VOXELS_PER_S


def _planned(paths: Paths, dataset: str, preset: str = DEFAULT_PLANS):  # type: ignore[no-untyped-def]
    return load_plan(paths, dataset, preset) if paths.plans_file(dataset, preset).is_file() else None


def _missing_preprocessing(paths: Paths, dataset: str, plan, configs: tuple[str, ...]) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    """Configurations whose preprocessed data (every raw case) or the dataset's splits.json are missing."""
    n_cases = len(load_dataset(paths.raw_dataset(dataset)).cases) if paths.raw_dataset(dataset).is_dir() else 0
    missing = []
    for name in configs:
        folder = paths.preprocessed_data(dataset, plan.configuration(name).data_identifier)
        if not folder.is_dir() or len(list_preprocessed_cases(folder)) < n_cases:
            missing.append(name)
    if not missing and not paths.splits_file(dataset).is_file():
        missing = list(configs)
    return tuple(missing)


@dataclass(frozen=True)
class TrainAllRequest:
    """What ``autoseg train-all`` was asked for."""

    datasets: tuple[str, ...] = ()
    """Names or ids; empty = every dataset in the raw root."""
    configs: tuple[str, ...] = ()
    """Empty = every planned configuration (2d and 3d_fullres for datasets not planned yet)."""
    folds: tuple[int | str, ...] = (0, 1, 2, 3, 4)
    trainer_overrides: tuple[str, ...] = ()
    gpu_memory_gb: float | None = None
    variant: str = "default"
    plans: str = DEFAULT_PLANS
    """Planner preset (``--plans resenc-l``): its plans file, and ``<preset>__<config>`` results."""


def build_train_all_jobs(paths: Paths, request: TrainAllRequest) -> list[JobSpec]:
    """Plan -> preprocess -> train per config x fold -> find-best, per dataset; finished stages omitted."""
    if not is_folder_name(request.variant):
        raise AutosegError(f"variant name {request.variant!r} must use letters, digits, '.', '_' or '-' only",
                           "--variant")
    get_preset(request.plans)
    names = [paths.resolve_dataset(d) for d in request.datasets] or paths.list_raw_datasets()
    if not names:
        raise AutosegError("no datasets found (DatasetXXX_Name folders)", paths.raw)
    jobs: list[JobSpec] = []
    for ds in dict.fromkeys(names):
        jobs += _dataset_jobs(paths, ds, request)
    return jobs


def fold_count(paths: Paths, dataset: str) -> tuple[int, str] | None:
    """How many cross-validation folds ``dataset`` has (or will get at preprocessing), and from where.

    The splits file when there is one; else the 5 folds (fewer with fewer cases) that
    preprocessing will make. None when that cannot be told yet (no raw dataset, unreadable one:
    the plan job reports that).
    """
    for file in (user_splits_file(paths, dataset), paths.splits_file(dataset)):
        if file.is_file():
            return load_splits(paths, dataset).n_folds, str(file)
    if not paths.raw_dataset(dataset).is_dir():
        return None
    try:
        cases = len(load_dataset(paths.raw_dataset(dataset)).cases)
    except DatasetError:
        return None
    n = min(DEFAULT_N_FOLDS, cases)
    return n, f"preprocessing will split its {cases} cases into {n} folds"


def check_folds(paths: Paths, dataset: str, folds: tuple[int | str, ...], where: str = "--folds") -> None:
    """Every numbered fold exists for ``dataset``: an unknown one fails now, not as a failed job."""
    known = fold_count(paths, dataset)
    if known is None:
        return
    n, source = known
    missing = [str(f) for f in folds if f != "all" and int(f) >= n]
    if missing:
        raise AutosegError(f"{dataset} has folds 0-{n - 1} and 'all' ({source}); no fold {', '.join(missing)}",
                           where)


def _dataset_jobs(paths: Paths, ds: str, req: TrainAllRequest) -> list[JobSpec]:
    check_folds(paths, ds, req.folds)
    plan = _planned(paths, ds, req.plans)
    configs = req.configs or (tuple(plan.configurations) if plan else DEFAULT_CONFIGS_UNPLANNED)
    if plan is not None:
        for name in configs:
            plan.configuration(name)  # unknown configuration: an error listing the planned ones
    # a cascade needs its previous stage on every fold, even when not asked for
    previous = tuple(dict.fromkeys(p for p in (previous_stage_of(plan, c) for c in configs) if p))
    configs = tuple(dict.fromkeys((*previous, *configs)))
    jobs: list[JobSpec] = []
    train_deps: tuple[str, ...] = ()
    if plan is None:
        plan_job = JobSpec.make(JobKind.PLAN, ds, configs=configs, preset=req.plans,
                                resources=Resources(gpus=0, gpu_memory_gb=req.gpu_memory_gb))
        prep = JobSpec.make(JobKind.PREPROCESS, ds, configs=configs, depends_on=(plan_job.job_id,),
                            preset=req.plans)
        jobs += [plan_job, prep]
        train_deps = (prep.job_id,)
    else:
        missing = _missing_preprocessing(paths, ds, plan, configs)
        if missing:
            prep = JobSpec.make(JobKind.PREPROCESS, ds, configs=missing, preset=req.plans)
            jobs.append(prep)
            train_deps = (prep.job_id,)
    train_ids: list[str] = []
    complete_configs = []
    trainer = apply_overrides(TrainerConfig(), req.trainer_overrides)  # a bad --set fails before any job starts
    validated = trainer.final_validation != "off"  # else nothing is validated or compared
    ensembles = validated and len(configs) > 1  # find-best can compare ensembles only with saved softmax maps
    for name in configs:
        conf = plan.configurations[name] if plan else None
        res = Resources(gpus=1, gpu_memory_gb=(conf.estimated_vram_gb or None) if conf else None,
                        est_duration_s=estimate_train_seconds(conf.patch_size, conf.batch_size, trainer) if conf else None)
        folds = tuple(dict.fromkeys((*CASCADE_FOLDS, *req.folds))) if name in previous else req.folds
        for fold in folds:
            job = JobSpec.make(JobKind.TRAIN, ds, config=qualified_config(name, req.plans), fold=fold,
                               variant=req.variant,
                               trainer_overrides=req.trainer_overrides, depends_on=train_deps, resources=res,
                               save_probabilities=ensembles)
            jobs.append(job)
            train_ids.append(job.job_id)
            if ensembles and _needs_probabilities(paths, job):
                val = JobSpec.make(JobKind.VALIDATE, ds, config=qualified_config(name, req.plans), fold=fold,
                                   variant=req.variant,
                                   depends_on=(job.job_id,), save_probabilities=True,
                                   resources=replace(res, est_duration_s=None))
                jobs.append(val)
                train_ids.append(val.job_id)
        if validated and set(range(5)) <= set(folds):
            complete_configs.append(qualified_config(name, req.plans))
    if complete_configs:
        jobs.append(JobSpec.make(JobKind.FIND_BEST, ds, configs=tuple(complete_configs), variant=req.variant,
                                 depends_on=tuple(train_ids)))
    return link_cascades(jobs, {ds: plan})


def _needs_probabilities(paths: Paths, job: JobSpec) -> bool:
    """A fold finished earlier without the validation softmax maps that ensembling needs.

    Its train job is DONE and will not run again, so a validate job adds the maps.
    """
    tid = job.training_id()
    fold_dir = paths.training_dir(tid)
    if not (fold_dir / FINAL).is_file():
        return False  # the train job itself will save them
    try:
        return not validation_complete(paths, tid, fold_dir, with_probabilities=True)
    except AutosegError:  # no splits yet: nothing trained from them either
        return False


def warn_changed_finished(paths: Paths, jobs: list[JobSpec]) -> list[str]:
    """Warn (one line per distinct change) about finished trainings whose ``--set`` now differs.

    A finished fold is not trained again (its job is done), so ``train-all --set epochs=4`` after
    ``epochs=2`` would otherwise report success for models trained with 2 epochs. Returns the lines.
    """
    changed: dict[str, list[str]] = {}
    for job in jobs:
        tid = job.training_id()
        if job.kind is not JobKind.TRAIN or tid is None:
            continue
        fold_dir = paths.training_dir(tid)
        if not (fold_dir / FINAL).is_file() or not (fold_dir / TRAINER_CONFIG_FILE).is_file():
            continue
        used = load_record(fold_dir / TRAINER_CONFIG_FILE, TrainerConfig)
        given = job.trainer_config()
        given = replace(given, seed=tid.seed) if tid.seed is not None else given
        changes = changed_keys(given, used, ignore=RESUME_MAY_CHANGE)
        if changes:
            changed.setdefault(format_changes(changes), []).append(job.job_id)
    lines = []
    for changes, ids in changed.items():
        more = f" and {len(ids) - 1} more" if len(ids) > 1 else ""
        lines.append(f"{len(ids)} finished training(s) ({ids[0]}{more}) keep the trainer config they were trained "
                     f"with; ignoring changed keys: {changes} (to train with them: `autoseg train ... --force` "
                     "per fold, or a new --variant)")
        log.warning("%s", lines[-1])
    return lines
