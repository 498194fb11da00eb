"""The ``train-all`` job graph: per dataset plan -> preprocess -> train per configuration x fold
(-> validate) -> find-best, leaving out what is already done, plus training-time estimates.

Pure graph building over what is on disk; `autoseg.schedule.runner.run_jobs` runs the result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from autoseg.common.errors import AutosegError
from autoseg.common.paths import Paths
from autoseg.schedule.jobs import CASCADE_FOLDS, JobKind, JobSpec, Resources, link_cascades, previous_stage_of

DEFAULT_CONFIGS_UNPLANNED = ("2d", "3d_fullres")
"""Configurations trained when a dataset is not planned yet and none are named (3d_lowres exists
only for large images, which is unknown before planning)."""

REFERENCE_VOXELS_PER_S = 6e6
"""Rough training throughput (patch voxels x batch per second) used only to order jobs longest-first."""

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


def _planned(paths: Paths, dataset: str):  # type: ignore[no-untyped-def]
    from autoseg.planning.plan import load_plan

    return load_plan(paths, dataset) if paths.plans_file(dataset).is_file() else None


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


def build_train_all_jobs(paths: Paths, request: TrainAllRequest) -> list[JobSpec]:
    """Plan -> preprocess -> train per config x fold -> find-best, per dataset; finished stages omitted."""
    names = [paths.resolve_dataset(d) for d in request.datasets] or paths.list_raw_datasets()
    if not names:
        raise AutosegError("no datasets found (DatasetXXX_Name folders)", paths.raw)
    jobs: list[JobSpec] = []
    for ds in dict.fromkeys(names):
        jobs += _dataset_jobs(paths, ds, request)
    return jobs


def _dataset_jobs(paths: Paths, ds: str, req: TrainAllRequest) -> list[JobSpec]:
    plan = _planned(paths, ds)
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
        plan_job = JobSpec.make(JobKind.PLAN, ds, configs=configs,
                                resources=Resources(gpus=0, gpu_memory_gb=req.gpu_memory_gb))
        prep = JobSpec.make(JobKind.PREPROCESS, ds, configs=configs, depends_on=(plan_job.job_id,))
        jobs += [plan_job, prep]
        train_deps = (prep.job_id,)
    else:
        missing = _missing_preprocessing(paths, ds, plan, configs)
        if missing:
            prep = JobSpec.make(JobKind.PREPROCESS, ds, configs=missing)
            jobs.append(prep)
            train_deps = (prep.job_id,)
    train_ids: list[str] = []
    complete_configs = []
    ensembles = len(configs) > 1  # find-best can compare ensembles only with saved softmax maps
    for name in configs:
        conf = plan.configurations[name] if plan else None
        res = Resources(gpus=1, gpu_memory_gb=(conf.estimated_vram_gb or None) if conf else None,
                        est_duration_s=estimate_train_seconds(conf.patch_size, conf.batch_size,
                                                              req.trainer_overrides) if conf else None)
        folds = tuple(dict.fromkeys((*CASCADE_FOLDS, *req.folds))) if name in previous else req.folds
        for fold in folds:
            job = JobSpec.make(JobKind.TRAIN, ds, config=name, fold=fold, variant=req.variant,
                               trainer_overrides=req.trainer_overrides, depends_on=train_deps, resources=res,
                               save_probabilities=ensembles)
            jobs.append(job)
            train_ids.append(job.job_id)
            if ensembles and _needs_probabilities(paths, job):
                val = JobSpec.make(JobKind.VALIDATE, ds, config=name, fold=fold, variant=req.variant,
                                   depends_on=(job.job_id,), save_probabilities=True,
                                   resources=replace(res, est_duration_s=None))
                jobs.append(val)
                train_ids.append(val.job_id)
        if set(range(5)) <= set(folds):
            complete_configs.append(name)
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
