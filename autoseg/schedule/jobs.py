"""The job model: what one scheduled process does, what it needs, and where its files live.

A `JobSpec` is a frozen, serializable description of one process (plan, preprocess, train one
fold, find-best). Its ``job_id`` is stable and derived from its fields, so a re-run of
``train-all`` recognizes the jobs of the previous run in the state store. `JobPaths` owns every
file name in a job's scheduler directory (``results/.autoseg/jobs/<safe id>/``); `JobRecord`
is the ``job.json`` written there at every start and end of an attempt.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import ClassVar

from autoseg.common.errors import AutosegError
from autoseg.common.paths import DEFAULT_PLANS, PLANS_SEPARATOR, Paths, TrainingId, split_config_dirname
from autoseg.planning.plans import Plan
from autoseg.train.config import TrainerConfig, apply_overrides

CASCADE_FOLDS: tuple[int, ...] = (0, 1, 2, 3, 4)
"""A cascade's previous stage is needed on every cross-validation fold: each case's
previous-stage segmentation comes from the fold that held it out (nnU-Net's 5-fold rule)."""

CASCADE_STAGE_BY_NAME = {"3d_cascade_fullres": "3d_lowres"}
"""Previous stage by configuration name, for datasets that have no plan yet."""


class JobKind(str, Enum):
    """What a job runs (one autoseg sub-command)."""

    PLAN = "plan"
    PREPROCESS = "preprocess"
    TRAIN = "train"
    VALIDATE = "validate"
    """Complete a finished fold's final validation (``train --continue`` on a finished fold), e.g.
    to add the softmax maps an ensemble comparison needs to a fold trained without them."""
    FIND_BEST = "find_best"


class JobState(str, Enum):
    """Life cycle of a job in the state store."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    BLOCKED = "blocked"
    """A dependency failed for good; the job never ran."""
    INTERRUPTED = "interrupted"
    """Stopped by Ctrl-C or a dead scheduler; the next run resumes it (``--continue``)."""


FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.BLOCKED})
"""States a run does not change any more (a new run retries FAILED/BLOCKED jobs)."""


@dataclass(frozen=True)
class Resources:
    """What one job needs: a GPU or not, CPU cores, GPU memory, and how long it should take."""

    gpus: int = 0
    cpus: int | None = None
    gpu_memory_gb: float | None = None
    est_duration_s: float | None = None


@dataclass(frozen=True)
class JobSpec:
    """One process to run, with its dependencies; ``command(paths)`` is its argv."""

    SCHEMA: ClassVar[str] = "autoseg.job"
    VERSION: ClassVar[int] = 1

    job_id: str
    kind: JobKind
    dataset: str
    config: str | None = None
    fold: int | str | None = None
    variant: str = "default"
    seed: int | None = None
    trainer_overrides: tuple[str, ...] = ()
    plans_file: str | None = None
    configs: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    resources: Resources = field(default_factory=Resources)
    save_probabilities: bool = False
    """Train jobs: keep the validation softmax maps (``--npz``) so find-best can score ensembles."""
    preset: str = DEFAULT_PLANS
    """Plan / preprocess jobs: the planner preset (``plan --preset``, ``preprocess --plans``). Train
    jobs name a preset's plans in their config instead (``resenc-l__3d_fullres``, `TrainingId`)."""

    def __post_init__(self) -> None:
        if self.trainer_overrides:
            self.trainer_config()  # a bad value fails here, as `autoseg train --set` would, not in the child

    def trainer_config(self) -> TrainerConfig:
        """The `TrainerConfig` this job trains with: ``trainer_overrides`` parsed once by `apply_overrides`.

        The overrides stay ``key=value`` text in the record (``job.json``, the state store), which
        is what the child's ``--set`` gets; the scheduler reads every value from this instead.
        """
        return apply_overrides(TrainerConfig(), self.trainer_overrides)

    @classmethod
    def make(cls, kind: JobKind, dataset: str, **fields: object) -> "JobSpec":
        """Build a spec whose ``job_id`` is derived from its fields (`make_job_id`)."""
        job_id = make_job_id(kind, dataset, config=fields.get("config"), fold=fields.get("fold"),  # type: ignore[arg-type]
                             variant=fields.get("variant", "default"), seed=fields.get("seed"),  # type: ignore[arg-type]
                             preset=fields.get("preset", DEFAULT_PLANS))  # type: ignore[arg-type]
        return cls(job_id=job_id, kind=kind, dataset=dataset, **fields)  # type: ignore[arg-type]

    @property
    def needs_gpu(self) -> bool:
        return self.resources.gpus > 0

    def training_id(self) -> TrainingId | None:
        """The training this job runs or validates (train and validate jobs)."""
        if self.kind not in (JobKind.TRAIN, JobKind.VALIDATE) or self.config is None or self.fold is None:
            return None
        return TrainingId(self.dataset, self.config, self.fold, self.variant, self.seed)

    def command(self, paths: Paths, num_workers: int | None = None) -> list[str]:
        """The child's argv: ``python -m autoseg --raw .. --preprocessed .. --results .. <verb> ...``.

        Train jobs always pass ``--continue`` so a retried or resumed attempt picks up its
        checkpoint instead of starting over. ``num_workers`` is the job's CPU share for
        data loading (train) or multiprocessing (plan/preprocess).
        """
        argv = [sys.executable, "-m", "autoseg", "--raw", str(paths.raw),
                "--preprocessed", str(paths.preprocessed), "--results", str(paths.results)]
        if self.kind is JobKind.TRAIN:
            argv += ["train", self.dataset, str(self.config), str(self.fold), "--continue",
                     "--variant", self.variant]
            if self.seed is not None:
                argv += ["--seed", str(self.seed)]
            for item in self.trainer_overrides:
                argv += ["--set", item]
            if self.plans_file:
                argv += ["--plans", self.plans_file]
            if num_workers is not None:
                argv += ["--num-workers", str(num_workers)]
            if self.save_probabilities:
                argv.append("--save-probabilities")
            argv.append("--quiet")
        elif self.kind is JobKind.VALIDATE:
            # on a finished fold --continue only completes the validation (a no-op when complete),
            # so the job is idempotent even if its train job already saved the maps
            argv += ["train", self.dataset, str(self.config), str(self.fold), "--continue",
                     "--variant", self.variant]
            if self.seed is not None:
                argv += ["--seed", str(self.seed)]
            if self.save_probabilities:
                argv.append("--save-probabilities")
            argv.append("--quiet")
        elif self.kind is JobKind.PLAN:
            argv += ["plan", self.dataset]
            if self.preset != DEFAULT_PLANS:
                argv += ["--preset", self.preset]
            if self.configs:
                argv += ["--configs", *self.configs]
            if self.resources.gpu_memory_gb:
                argv += ["--gpu-memory", f"{self.resources.gpu_memory_gb:g}"]
            if num_workers is not None:
                argv += ["-j", str(num_workers)]
        elif self.kind is JobKind.PREPROCESS:
            argv += ["preprocess", self.dataset]
            if self.configs:
                argv += ["--configs", *self.configs]
            if num_workers is not None:
                argv += ["-j", str(num_workers)]
            if self.plans_file or self.preset != DEFAULT_PLANS:
                argv += ["--plans", self.plans_file or self.preset]
        elif self.kind is JobKind.FIND_BEST:
            # the job only runs when its trainings changed, so a stale best.json is replaced
            argv += ["find-best", self.dataset, "--variant", self.variant, "--force"]
            if self.configs:
                argv += ["-c", *self.configs]
        return argv


def make_job_id(kind: JobKind, dataset: str, config: str | None = None, fold: int | str | None = None,
                variant: str = "default", seed: int | None = None, preset: str = DEFAULT_PLANS) -> str:
    """``train:Dataset004_Hippocampus:3d_fullres:default:fold_0`` (``...:seed_1:fold_0``); plan/
    preprocess/find-best ids name the kind, dataset, preset and variant (derived plans are per variant)."""
    parts = [JobKind(kind).value, dataset]
    if kind in (JobKind.TRAIN, JobKind.VALIDATE):
        parts += [str(config), variant]
        if seed is not None:
            parts.append(f"seed_{seed}")
        parts.append(f"fold_{fold}")
    else:
        if preset != DEFAULT_PLANS:
            parts.append(preset)
        if variant != "default":
            parts.append(variant)
    return ":".join(parts)


def qualified_config(config: str, preset: str) -> str:
    """A configuration as the jobs and results folders of ``preset``'s plans name it (`TrainingId`)."""
    return config if preset == DEFAULT_PLANS else f"{preset}{PLANS_SEPARATOR}{config}"


_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def safe_job_id(job_id: str) -> str:
    """A file-name-safe form of a job id (':' -> '-'); other odd characters add a short hash."""
    text = job_id.replace(":", "-")
    if _SAFE.search(text):
        digest = hashlib.sha1(job_id.encode()).hexdigest()[:8]
        text = f"{_SAFE.sub('_', text)}-{digest}"
    return text


@dataclass(frozen=True)
class JobPaths:
    """Every file name in one job's scheduler directory ``results/.autoseg/jobs/<safe id>/``."""

    folder: Path

    @classmethod
    def of(cls, paths: Paths, job_id: str) -> "JobPaths":
        return cls(paths.scheduler_dir() / "jobs" / safe_job_id(job_id))

    @property
    def record(self) -> Path:
        """job.json: the spec, the environment it was started with, times, exit status."""
        return self.folder / "job.json"

    @property
    def log(self) -> Path:
        """log.txt: the child's stdout and stderr, all attempts appended."""
        return self.folder / "log.txt"

    @property
    def tmp(self) -> Path:
        """The child's TMPDIR."""
        return self.folder / "tmp"

    @property
    def compile_cache(self) -> Path:
        """The child's TORCHINDUCTOR_CACHE_DIR (compiled kernels are per job, never shared)."""
        return self.folder / "compile_cache"

    @property
    def slurm(self) -> Path:
        """submitit's folder for this job (Slurm executor only)."""
        return self.folder / "slurm"

    def make(self) -> "JobPaths":
        for d in (self.folder, self.tmp, self.compile_cache):
            d.mkdir(parents=True, exist_ok=True)
        return self


@dataclass(frozen=True)
class JobRecord:
    """``job.json``: one attempt of a job as it was started (and, once over, how it ended)."""

    SCHEMA: ClassVar[str] = "autoseg.job_record"
    VERSION: ClassVar[int] = 1

    spec: JobSpec
    attempt: int
    state: JobState
    executor: str
    command: tuple[str, ...]
    env: dict[str, str]
    """The variables the scheduler set for the child (CUDA_VISIBLE_DEVICES, CPU share, paths, TMPDIR)."""
    gpu: str | None
    cpus: int
    host: str
    external_id: str | None = None
    """Process id (local) or Slurm job id."""
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    cores: tuple[int, ...] = ()
    """The CPU cores it was pinned to (its share; empty where the executor places it, Slurm)."""
    workers: int | None = None
    """Data-loader workers (trainings) or processes (plan/preprocess) it was given."""
    augment_device: str | None = None
    """Where a training's augmentation runs as the scheduler sized its share (cpu/device)."""


def previous_stage_of(plan: Plan | None, config: str | None) -> str | None:
    """The configuration whose predictions ``config`` takes as input (a cascade), or None."""
    if config is None:
        return None
    preset, config = split_config_dirname(config)  # a preset's stage is followed by its own previous stage
    if plan is not None and config in plan.configurations:
        prev = plan.configurations[config].previous_stage
    else:
        prev = CASCADE_STAGE_BY_NAME.get(config)
    return None if prev is None else qualified_config(prev, preset)


def link_cascades(jobs: Sequence[JobSpec], plans: Mapping[str, Plan | None]) -> list[JobSpec]:
    """Make every cascade training wait for all folds of its previous stage (same dataset, variant, seed).

    The previous stage's train jobs must be in ``jobs``; a missing one is an `AutosegError`
    naming it (the callers add them: train-all always, sweeps when asked for).
    """
    ids = {j.job_id for j in jobs}
    out: list[JobSpec] = []
    for job in jobs:
        prev = previous_stage_of(plans.get(job.dataset), job.config) if job.kind is JobKind.TRAIN else None
        if prev is None:
            out.append(job)
            continue
        needed = [make_job_id(JobKind.TRAIN, job.dataset, prev, f, job.variant, job.seed) for f in CASCADE_FOLDS]
        missing = [n for n in needed if n not in ids]
        if missing:
            raise AutosegError(f"{job.config} needs {prev} trained on folds "
                               f"{', '.join(map(str, CASCADE_FOLDS))} first; missing {', '.join(missing)} "
                               f"(add {prev} and those folds)", where=job.job_id)
        out.append(replace(job, depends_on=tuple(dict.fromkeys((*job.depends_on, *needed)))))
    return out
