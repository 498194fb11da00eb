"""The ``train-all`` job graph: per dataset plan -> preprocess -> train per configuration x fold
(-> validate) -> find-best, leaving out what is already done, plus training-time estimates.

Pure graph building over what is on disk; `autoseg.schedule.runner.run_jobs` runs the result.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

from autoseg.common.errors import AutosegError
from autoseg.common.paths import DEFAULT_PLANS, Paths
from autoseg.schedule.jobs import (CASCADE_FOLDS, JobKind, JobSpec, Resources, link_cascades, previous_stage_of,
                                   qualified_config)

log = logging.getLogger(__name__)

DEFAULT_CONFIGS_UNPLANNED = ("2d", "3d_fullres")
"""Configurations trained when a dataset is not planned yet and none are named (3d_lowres exists
only for large images, which is unknown before planning)."""

REFERENCE_VOXELS_PER_S = 6e6
"""Rough training throughput (patch voxels x batch per second) used only to order jobs longest-first."""

VARIANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")
"""A variant is a folder name (as `autoseg train --variant` checks it)."""

DEFAULT_EPOCHS = 1000
DEFAULT_ITERATIONS_PER_EPOCH = 250
DEFAULT_VAL_ITERATIONS = 50
"""nnU-Net's schedule (also TrainerConfig's defaults), for duration estimates without ``--set``."""


def _override_number(overrides: tuple[str, ...], keys: tuple[str, ...], default: float) -> float:
    value = default
    for item in overrides:
        key, _, text = item.partition("=")
        if key.strip() in keys:
            try:
                value = float(text)
            except ValueError:
                pass  # the trainer reports a bad value with its own message
    return value


def estimate_train_seconds(patch_size: tuple[int, ...], batch_size: int, overrides: tuple[str, ...] = ()) -> float:
    """Estimated training time from the plan and the schedule: patch voxels x batch x steps / throughput."""
    voxels = 1.0
    for s in patch_size:
        voxels *= s
    batch = _override_number(overrides, ("batch_size",), batch_size)
    epochs = _override_number(overrides, ("epochs",), DEFAULT_EPOCHS)
    steps = epochs * (_override_number(overrides, ("iterations_per_epoch",), DEFAULT_ITERATIONS_PER_EPOCH)
                      + _override_number(overrides, ("val_iterations",), DEFAULT_VAL_ITERATIONS))
    return voxels * batch * steps / REFERENCE_VOXELS_PER_S


def _planned(paths: Paths, dataset: str, preset: str = DEFAULT_PLANS):  # type: ignore[no-untyped-def]
    from autoseg.planning.store import load_plan

    return load_plan(paths, dataset, preset) if paths.plans_file(dataset, preset).is_file() else None


def _missing_preprocessing(paths: Paths, dataset: str, plan, configs: tuple[str, ...]) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    """Configurations whose preprocessed data (every raw case) or the dataset's splits.json are missing."""
    from autoseg.dataset.spec import load_dataset
    from autoseg.preprocess import list_preprocessed_cases

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
    if not VARIANT_RE.fullmatch(request.variant):
        raise AutosegError(f"variant name {request.variant!r} must use letters, digits, '.', '_' or '-' only",
                           "--variant")
    from autoseg.planning.presets import get_preset

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
    from autoseg.common.errors import DatasetError
    from autoseg.dataset.spec import load_dataset
    from autoseg.splits import DEFAULT_N_FOLDS, load_splits, user_splits_file

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


def _final_validation_off(overrides: tuple[str, ...]) -> bool:
    """Whether ``--set`` turns the final validation off (then nothing is validated or compared).

    Parsing the overrides here also makes a bad ``--set`` fail before any job starts.
    """
    from autoseg.train.config import TrainerConfig, apply_overrides

    return apply_overrides(TrainerConfig(), overrides).final_validation == "off"


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
    validated = not _final_validation_off(req.trainer_overrides)
    ensembles = validated and len(configs) > 1  # find-best can compare ensembles only with saved softmax maps
    for name in configs:
        conf = plan.configurations[name] if plan else None
        res = Resources(gpus=1, gpu_memory_gb=(conf.estimated_vram_gb or None) if conf else None,
                        est_duration_s=estimate_train_seconds(conf.patch_size, conf.batch_size,
                                                              req.trainer_overrides) if conf else None)
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
    from autoseg.train.checkpoint import FINAL
    from autoseg.train.run import validation_complete

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
    from autoseg.common.jsonio import load_record
    from autoseg.train.checkpoint import FINAL
    from autoseg.train.config import TrainerConfig, apply_overrides, changed_keys, format_changes
    from autoseg.train.run import RESUME_MAY_CHANGE, TRAINER_CONFIG_FILE

    changed: dict[str, list[str]] = {}
    for job in jobs:
        tid = job.training_id()
        if job.kind is not JobKind.TRAIN or tid is None:
            continue
        fold_dir = paths.training_dir(tid)
        if not (fold_dir / FINAL).is_file() or not (fold_dir / TRAINER_CONFIG_FILE).is_file():
            continue
        used = load_record(fold_dir / TRAINER_CONFIG_FILE, TrainerConfig)
        given = apply_overrides(TrainerConfig(), job.trainer_overrides)
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
