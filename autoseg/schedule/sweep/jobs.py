"""A sweep's files, derived plans and job graph: what `autoseg sweep` runs, built from a `SweepSpec`.

Each variant trains under ``results/<dataset>/<config>/<sweep>.<variant>/seed_<s>/fold_<k>/``
(``<preset>__<config>`` for a variant with ``plan.preset``, trained from that preset's plans);
the sweep name is part of the folder so that two sweeps that both have a ``baseline`` never
resume each other's checkpoints. Plan overrides give a derived plan stored at
``results/<dataset>/<config>/<sweep>.<variant>/plans.json``; its preprocessed data is shared with
the dataset's plan unless the overrides change preprocessing (target spacing, resampling orders),
in which case it gets its own ``data_identifier`` and a preprocess job. The sweep itself is
recorded in ``results/sweeps/<name>/sweep.json`` (next to its report). Nothing here runs a job:
see `autoseg.schedule.sweep.run`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from autoseg.common.errors import ConfigError
from autoseg.common.jsonio import load_record, save_record
from autoseg.common.paths import Paths
from autoseg.dataset.spec import load_dataset
from autoseg.planning.plan import apply_plan_overrides
from autoseg.planning.plans import Configuration, Plan
from autoseg.preprocess import list_preprocessed_cases
from autoseg.schedule.jobs import JobKind, JobSpec, Resources, link_cascades, qualified_config
from autoseg.schedule.graph import check_folds, estimate_train_seconds
from autoseg.schedule.sweep.spec import SweepSpec, Variant, canonical_json, split_preset
from autoseg.train.config import TrainerConfig, apply_overrides

SWEEP_FILENAME = "sweep.json"
"""The sweep record in `sweep_dir`: the spec as first run, so a re-run can check it still means the same."""

PREPROCESSING_FIELDS = frozenset({"spacing", "resample_order_data", "resample_order_seg"})
"""Plan fields that change the preprocessed arrays; overriding one needs its own preprocessing.
Everything else (patch_size, batch_size, topology, batch_dice) reuses the dataset's data."""


# --------------------------------------------------------------------------- files of a sweep


def sweep_dir(paths: Paths, name: str) -> Path:
    """``<results>/sweeps/<name>/``: the sweep record and its report."""
    return paths.results / "sweeps" / name


def sweep_record_file(paths: Paths, name: str) -> Path:
    """``<results>/sweeps/<name>/sweep.json``: the `SweepSpec` `record_sweep` wrote."""
    return sweep_dir(paths, name) / SWEEP_FILENAME


def derived_plan_file(paths: Paths, spec: SweepSpec, dataset: str, config: str, variant: Variant) -> Path:
    """``results/<dataset>/[<preset>__]<config>/<sweep>.<variant>/plans.json``: the plan a variant trains with."""
    return paths.results / dataset / qualified_config(config, spec.preset(variant)) / variant.run_name(spec.name) \
        / "plans.json"


def _variant_signature(spec: SweepSpec, v: Variant) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return spec.trainer_overrides(v), spec.plan_overrides(v)


def record_sweep(spec: SweepSpec, paths: Paths) -> SweepSpec:
    """Write (or extend) ``sweeps/<name>/sweep.json`` before any job starts.

    A variant already recorded under the same name must still mean the same overrides:
    otherwise its finished jobs (skipped as DONE) would silently stand for a different
    setting. Adding variants, folds or seeds is fine; the record keeps its first start time.
    """
    file = sweep_record_file(paths, spec.name)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if file.is_file():
        old = load_record(file, SweepSpec)
        old_by_name = {v.name: v for v in old.variants}
        for v in spec.variants:
            prev = old_by_name.get(v.name)
            if prev is not None and _variant_signature(old, prev) != _variant_signature(spec, v):
                raise ConfigError(
                    f"variant {v.name!r} of sweep {spec.name!r} meant {list(_variant_signature(old, prev))} "
                    f"when it was started, now {list(_variant_signature(spec, v))}; give the sweep a new "
                    f"name (its results are under {file.parent})", spec.source)
        started = old.started or started
    spec = dataclasses.replace(spec, started=started)
    save_record(file, spec)
    return spec


# --------------------------------------------------------------------------- derived plans


def preprocessing_identifier(config: Configuration) -> str:
    """A data_identifier for a configuration whose preprocessing was overridden: the planned
    identifier plus a hash of the preprocessing fields, so equal settings share one folder."""
    fields = {f: getattr(config, f) for f in sorted(PREPROCESSING_FIELDS)}
    digest = hashlib.sha1(canonical_json(fields).encode()).hexdigest()[:8]
    return f"{config.data_identifier}_{digest}"


def derive_plan(plan: Plan, overrides: typing.Sequence[str]) -> tuple[Plan, tuple[str, ...]]:
    """Apply plan overrides; return the derived plan and the configs whose preprocessing changed.

    Only a change of target spacing or resampling gets a new ``data_identifier`` (and needs a
    preprocess run); patch size, batch size and topology train on the dataset's data as is.
    """
    derived = apply_plan_overrides(plan, list(overrides))
    configs = dict(derived.configurations)
    changed = []
    for name, cfg in derived.configurations.items():
        old = plan.configurations.get(name)
        if old is None:
            continue
        if any(canonical_json(getattr(cfg, f)) != canonical_json(getattr(old, f)) for f in PREPROCESSING_FIELDS):
            if cfg.data_identifier == old.data_identifier:  # e.g. only a resampling order changed
                configs[name] = dataclasses.replace(cfg, data_identifier=preprocessing_identifier(cfg))
            changed.append(name)
        elif cfg.data_identifier != old.data_identifier:
            configs[name] = dataclasses.replace(cfg, data_identifier=old.data_identifier)
    return dataclasses.replace(derived, configurations=configs), tuple(changed)


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class SweepJobs:
    """The job graph of a sweep: dataset setup (plan/preprocess) and the variant jobs."""

    setup: tuple[JobSpec, ...]
    """Plan and preprocess jobs for datasets not (fully) planned/preprocessed yet (JobSpec)."""
    jobs: tuple[JobSpec, ...]
    """Setup jobs again, derived-plan preprocess jobs and one train job per run (JobSpec)."""
    unplanned: tuple[str, ...]
    """Datasets whose plan does not exist yet: their derived plans are made after setup."""

    @property
    def train_jobs(self) -> tuple[JobSpec, ...]:
        return tuple(j for j in self.jobs if j.kind is JobKind.TRAIN)


def _preprocessed_complete(paths: Paths, dataset: str, plan: Plan, configs: tuple[str, ...]) -> bool:
    """Every configuration's data folder holds every training case, and splits.json exists."""
    if not paths.splits_file(dataset).is_file():
        return False
    raw = paths.raw_dataset(dataset)
    wanted = {c.case_id for c in load_dataset(raw).cases} if raw.is_dir() else set()
    for c in configs:
        folder = paths.preprocessed_data(dataset, plan.configuration(c).data_identifier)
        if not folder.is_dir() or not wanted <= set(list_preprocessed_cases(folder)):
            return False
    return True


def _presets(spec: SweepSpec) -> tuple[str, ...]:
    """The planner presets the sweep's variants train with, in order of first use."""
    return tuple(dict.fromkeys(spec.preset(v) for v in spec.variants))


def setup_jobs(spec: SweepSpec, paths: Paths) -> list[JobSpec]:
    """Plan (if its plans file is missing) and preprocess (if data is missing) jobs per dataset and preset.

    The preprocess job id names the configurations, so a ``train-all`` preprocess of other
    configurations (DONE in the store) does not stand in for this one.
    """
    jobs = []
    for ds in spec.datasets:
        for preset in _presets(spec):
            file = paths.plans_file(ds, preset)
            planned = file.is_file()
            deps: tuple[str, ...] = ()
            if not planned:
                plan_job = JobSpec.make(JobKind.PLAN, ds, configs=spec.configs, preset=preset)
                jobs.append(plan_job)
                deps = (plan_job.job_id,)
            if not planned or not _preprocessed_complete(paths, ds, load_record(file, Plan), spec.configs):
                jobs.append(JobSpec.make(JobKind.PREPROCESS, ds, variant="+".join(spec.configs), configs=spec.configs,
                                         depends_on=deps, preset=preset))
    return jobs


def _write_derived_plan(file: Path, plan: Plan) -> None:
    """Write a variant's plan once; a different existing one means the dataset's plan changed
    under a started sweep, which would mix two settings in one variant."""
    if file.is_file():
        old = load_record(file, Plan)
        if canonical_json(old) == canonical_json(plan):
            return
        raise ConfigError("differs from the plan this variant started with (was the dataset re-planned?); "
                          "give the sweep a new name or delete the variant's folder", file)
    save_record(file, plan)


def build_sweep_jobs(spec: SweepSpec, paths: Paths, write_plans: bool = True) -> SweepJobs:
    """Every job of the sweep: (dataset, config, variant, seed, fold) -> one train job.

    Variants with plan overrides get a derived plan (written here when ``write_plans``) and,
    only when their preprocessing differs, a preprocess job for it, shared by all variants with
    the same preprocessing. Datasets without a plan yet get their train jobs after setup.
    """
    for ds in spec.datasets:  # an unknown fold fails now, in one line, not as failed jobs
        check_folds(paths, ds, spec.folds, where=f"{spec.source}:folds")
    setup = setup_jobs(spec, paths)
    setup_ids = {(ds, p): tuple(j.job_id for j in setup if j.dataset == ds and j.kind is JobKind.PREPROCESS
                                and j.preset == p) for ds in spec.datasets for p in _presets(spec)}
    jobs: list[JobSpec] = list(setup)
    unplanned = tuple(dict.fromkeys(ds for ds in spec.datasets for p in _presets(spec)
                                    if not paths.plans_file(ds, p).is_file()))
    prep_jobs: dict[tuple[str, tuple[str, ...]], JobSpec] = {}
    for ds in spec.datasets:
        plans_of = {p: load_record(paths.plans_file(ds, p), Plan) if paths.plans_file(ds, p).is_file() else None
                    for p in _presets(spec)}
        for v in spec.variants:
            preset, overrides = split_preset(spec.plan_overrides(v))
            plan = plans_of[preset]
            deps = setup_ids[(ds, preset)]
            plans_files: dict[str, str | None] = {c: None for c in spec.configs}
            derived = plan
            if overrides:
                plans_files = {c: str(derived_plan_file(paths, spec, ds, c, v)) for c in spec.configs}
                if plan is not None:
                    derived, changed = derive_plan(plan, overrides)
                    if write_plans:
                        for c in spec.configs:
                            _write_derived_plan(derived_plan_file(paths, spec, ds, c, v), derived)
                    if changed:
                        key = (ds, tuple(derived.configurations[c].data_identifier for c in changed))
                        if key not in prep_jobs:
                            prep_jobs[key] = JobSpec.make(
                                JobKind.PREPROCESS, ds, variant="+".join(key[1]), configs=changed,
                                plans_file=plans_files[changed[0]], depends_on=deps)
                            jobs.append(prep_jobs[key])
                        deps = deps + (prep_jobs[key].job_id,)
            for c in spec.configs:
                conf = derived.configuration(c) if derived is not None else None
                resources = Resources(gpus=1, gpu_memory_gb=(conf.estimated_vram_gb or None) if conf else None,
                                      est_duration_s=estimate_train_seconds(
                                          conf.patch_size, conf.batch_size,
                                          apply_overrides(TrainerConfig(), spec.trainer_overrides(v))) if conf else None)
                for seed in spec.seeds:
                    for fold in spec.folds:
                        jobs.append(JobSpec.make(
                            JobKind.TRAIN, ds, config=qualified_config(c, preset), fold=fold,
                            variant=v.run_name(spec.name), seed=seed,
                            trainer_overrides=spec.trainer_overrides(v), plans_file=plans_files[c],
                            depends_on=deps, resources=resources))
    plans = {ds: None if not paths.plans_file(ds).is_file() else load_record(paths.plans_file(ds), Plan)
             for ds in spec.datasets}  # cascade links: a preset's stages are named like the default's
    return SweepJobs(setup=tuple(setup), jobs=tuple(link_cascades(jobs, plans)), unplanned=unplanned)
