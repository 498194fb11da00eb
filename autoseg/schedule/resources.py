"""GPU slots, CPU shares and packing: who runs where, with how many cores.

Every running job holds a disjoint group of CPU cores (its affinity, thread count and
data-loader workers), so shares never sum to more than the machine's cores. A share is decided
when a job starts, from the cores free at that moment and what the job can use (`core_need`: a
training that augments on its GPU needs 2 cores, one that augments in CPU workers up to 13), and
given back when it ends (`divide_cores` has the rule). A lone training gets its full need; four
CPU-augmented trainings on a 16-core machine get 4 cores each instead of 16 workers each.
GPU jobs take a slot on one GPU; several jobs share a GPU only with ``--jobs-per-gpu`` or when
the plan's memory estimates show they fit (``--gpu-memory`` or the device's memory).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from autoseg.common.errors import AutosegError, ConfigError
from autoseg.data.augment import resolve_augment_device
from autoseg.schedule.jobs import JobKind, JobSpec
from autoseg.train.config import TrainerConfig, apply_overrides

log = logging.getLogger(__name__)

AUTO_PACK_MAX_JOBS_PER_GPU = 4
"""Automatic packing never puts more than this many trainings on one GPU (CPU-side limits dominate)."""

GPU_MEMORY_HEADROOM_GB = 1.0
"""Kept free per GPU when packing by memory estimates (CUDA context, allocator fragmentation)."""

NNUNET_FOLDS = 5
"""nnU-Net's cross-validation: five folds, 0..4."""

DEVICE_AUGMENT_CORES = 2
"""Cores a GPU training that augments on its GPU (``augment.device=device``) can use: the main
process plus one data-loader worker that only loads and crops patches."""

CPU_AUGMENT_CORES = 13
"""Cores a training that augments in CPU data-loader workers can use: nnU-Net's 12 augmentation
workers per GPU (``nnunetv2.utilities.default_n_proc_DA``: 12 on a 4-GPU, 48-thread machine)
plus the main process. A training on a CPU slot (the network on the CPU) is capped there too."""

PROCESS_POOL_CORES = 8
"""Cores a plan, preprocess, find-best or validate job can use (its process pool): nnU-Net's
``default_num_processes``."""

MIN_SHARE_CORES = 2
"""Every starting job gets this many cores (where it can use them) before any core is kept back
for jobs that may start later: a training's main process plus at least one data-loader worker."""

GPU_ID_RE = re.compile(r"^(?:\d+|(?:GPU|MIG)-[0-9A-Za-z][0-9A-Za-z/-]*)$")
"""What ``CUDA_VISIBLE_DEVICES`` accepts: device indices (0, 1, ...) or GPU-/MIG- UUIDs."""


def machine_cores() -> tuple[int, ...]:
    """The CPU cores this process may use (its affinity mask, which respects cgroups/taskset)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return tuple(range(os.cpu_count() or 1))


def format_cores(cores: Sequence[int]) -> str:
    """``(0, 1, 2, 3, 8)`` -> ``"0-3,8"`` (as taskset and ``/proc/*/status`` write core lists)."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(cores):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_gpus(text: str | None) -> tuple[str, ...]:
    """``"0,1,2,3"`` -> ("0", "1", "2", "3"); indices or ``GPU-``/``MIG-`` UUIDs, as CUDA_VISIBLE_DEVICES takes.

    Anything else (``a``, ``-1``) would reach the children as a CUDA_VISIBLE_DEVICES that hides
    every GPU, so they would train on the CPU: refused here.
    """
    if not text:
        return ()
    ids = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [i for i in ids if not GPU_ID_RE.match(i)]
    if bad:
        raise AutosegError(f"{', '.join(repr(b) for b in bad)} is not a GPU id (use device indices like 0,1 "
                           "or GPU-/MIG- UUIDs as nvidia-smi -L prints them)", "--gpus")
    if len(set(ids)) != len(ids):
        raise AutosegError(f"a GPU id appears twice in {text!r}", "--gpus")
    return ids


def parse_folds(text: str) -> tuple[int | str, ...]:
    """``"0-4"``, ``"0,1,2"``, ``"all"`` (nnU-Net's train-on-every-case fold) or mixes like ``"0-4,all"``."""
    folds: list[int | str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "all":
            folds.append("all")
        elif re.fullmatch(r"\d+-\d+", part):
            a, b = (int(x) for x in part.split("-"))
            if b < a:
                raise AutosegError(f"empty fold range {part!r}", "--folds")
            folds.extend(range(a, b + 1))
        elif part.isdigit():
            folds.append(int(part))
        else:
            raise AutosegError(f"cannot read fold {part!r} (use 0-4, 0,1,2 or all)", "--folds")
    if not folds:
        raise AutosegError("no folds given", "--folds")
    return tuple(dict.fromkeys(folds))


def check_gpus_exist(gpus: tuple[str, ...], cuda_available: bool, device_count: int) -> None:
    """The given device indices exist on this machine (UUIDs cannot be checked without NVML; CUDA does).

    Without this a machine without CUDA "trains on GPU 0 and 1" on its CPU while every table
    says GPU 0 and 1.
    """
    if not gpus:
        return
    if not cuda_available:
        raise AutosegError(f"no CUDA device on this machine, so GPU(s) {', '.join(gpus)} cannot be used "
                           "(leave out --gpus to train on CPU slots)", "--gpus")
    missing = [g for g in gpus if g.isdigit() and int(g) >= device_count]
    if missing:
        raise AutosegError(f"GPU(s) {', '.join(missing)} not found: CUDA sees {device_count} device(s), "
                           f"0-{device_count - 1}", "--gpus")


def query_gpu_memory_gb(gpus: tuple[str, ...]) -> float | None:
    """The smallest total memory of the given CUDA devices, or None without CUDA."""
    if not gpus:
        return None
    import torch  # lazily: the scheduler itself never needs torch otherwise

    if not torch.cuda.is_available():
        return None
    sizes = []
    for g in gpus:
        if not g.isdigit() or int(g) >= torch.cuda.device_count():
            return None
        sizes.append(torch.cuda.get_device_properties(int(g)).total_memory / 1024**3)
    return min(sizes)


def requested_augment_device(overrides: Sequence[str]) -> str:
    """The ``augment.device`` a job's trainer overrides ask for, as `apply_overrides` reads them
    (the last one wins); ``auto`` when none does."""
    return apply_overrides(TrainerConfig(), overrides).augment.device


def augment_device(job: JobSpec, on_gpu: bool) -> str | None:
    """Where a training's augmentation runs as the scheduler sees it (`resolve_augment_device`):
    its ``augment.device`` override, ``auto`` meaning ``device`` on a GPU slot and ``cpu`` on a CPU
    slot. None for jobs that do not augment (anything but a training)."""
    if job.kind is not JobKind.TRAIN:
        return None
    try:
        return resolve_augment_device(job.trainer_config().augment.device, "cuda" if on_gpu else "cpu")
    except ConfigError:
        return "cpu"  # the trainer itself refuses the value; until then assume the larger need


def core_need(job: JobSpec, on_gpu: bool) -> int:
    """How many cores ``job`` can use: `DEVICE_AUGMENT_CORES` for a GPU training that augments on
    its GPU, `CPU_AUGMENT_CORES` for one that augments in CPU workers (or trains on the CPU),
    `PROCESS_POOL_CORES` for everything else; ``Resources.cpus`` when the job names its own."""
    if job.resources.cpus:
        return max(1, job.resources.cpus)
    if job.kind is JobKind.TRAIN:
        return DEVICE_AUGMENT_CORES if on_gpu and augment_device(job, on_gpu) == "device" else CPU_AUGMENT_CORES
    return PROCESS_POOL_CORES


def divide_cores(free: int, needs: Sequence[int], later_needs: Sequence[int] = ()) -> list[int]:
    """CPU shares for the jobs starting now (``needs``, in priority order) out of ``free`` cores.

    1. Each starting job gets one core, then each a second one where it can use it (one
       data-loader worker), in priority order, while cores last: no training starts without a
       worker while a core stays free.
    2. The remaining cores go one at a time to the job with the fewest cores below its need
       (max-min fairness), counting as contenders the jobs that could start into a still-idle
       slot while these run (``later_needs``); their shares are not handed out but stay free,
       so the first of many queued jobs does not take every core and starve the rest.

    A lone job gets its full need (or every free core). Needs ``len(needs) <= free``.
    """
    if len(needs) > free:
        raise ValueError(f"{len(needs)} jobs cannot start on {free} free core(s)")
    shares = [0] * len(needs)
    left = free
    for floor in range(1, MIN_SHARE_CORES + 1):
        for i, need in enumerate(needs):
            if left and shares[i] < min(floor, max(1, need)):
                shares[i] += 1
                left -= 1
    everyone = [*shares, *([0] * len(later_needs))]
    caps = [max(1, n) for n in (*needs, *later_needs)]
    while left:
        below = [i for i in range(len(everyone)) if everyone[i] < caps[i]]
        if not below:
            break
        i = min(below, key=lambda k: (everyone[k], k))  # starting jobs first among equals
        everyone[i] += 1
        left -= 1
    return everyone[:len(needs)]


@dataclass(frozen=True)
class Slot:
    """Where one running job sits: its GPU (None for CPU jobs) and its own CPU cores."""

    gpu: str | None
    cpus: tuple[int, ...]


@dataclass(frozen=True)
class PoolConfig:
    """The machine as the local executor sees it."""

    gpus: tuple[str, ...] = ()
    jobs_per_gpu: int | None = None
    """Fixed packing; None = by memory estimate when ``gpu_memory_gb`` is known, else 1."""
    gpu_memory_gb: float | None = None
    cpu_slots: int = 1
    """Concurrent CPU-only jobs (plan, preprocess, find-best)."""
    cores: tuple[int, ...] = field(default_factory=machine_cores)


@dataclass
class _Occupancy:
    """Which GPU and CPU slots are taken (the memory estimate of each job per GPU)."""

    gpu_jobs: dict[str, list[float]]
    cpu_jobs: int = 0

    def copy(self) -> "_Occupancy":
        return _Occupancy({g: list(v) for g, v in self.gpu_jobs.items()}, self.cpu_jobs)


class SlotPool:
    """Hands out GPU slots and disjoint CPU core groups to jobs; the runner's only notion of a machine."""

    def __init__(self, cfg: PoolConfig) -> None:
        if cfg.jobs_per_gpu is not None and cfg.jobs_per_gpu < 1:
            raise AutosegError("must be at least 1", "--jobs-per-gpu")
        if cfg.cpu_slots < 1:
            raise AutosegError("must be at least 1", "-j")
        if not cfg.cores:
            raise AutosegError("no CPU cores to run jobs on (an empty affinity mask?)")
        self.cfg = cfg
        self.per_gpu_cap = cfg.jobs_per_gpu or (AUTO_PACK_MAX_JOBS_PER_GPU if cfg.gpu_memory_gb else 1)
        wanted = len(cfg.gpus) * self.per_gpu_cap + cfg.cpu_slots
        if wanted > len(cfg.cores):
            log.warning("%d job slots but only %d CPU cores: running at most %d jobs at once so CPU shares "
                        "do not overlap", wanted, len(cfg.cores), len(cfg.cores))
        self._free_cores: set[int] = set(cfg.cores)
        self._busy = _Occupancy({g: [] for g in cfg.gpus})

    @property
    def free_cores(self) -> tuple[int, ...]:
        """Cores no running job holds."""
        return tuple(sorted(self._free_cores))

    def job_memory_gb(self, job: JobSpec) -> float:
        """Memory a job is assumed to take on its GPU (a whole GPU when unknown)."""
        if self.cfg.gpu_memory_gb is None:
            return 0.0
        need = job.resources.gpu_memory_gb
        return self.cfg.gpu_memory_gb if not need else need

    def acquire(self, ready: Sequence[JobSpec],
                later: Callable[[list[JobSpec]], Sequence[JobSpec]] | None = None) -> list[tuple[JobSpec, Slot]]:
        """Start what fits of ``ready`` (priority order), each with a GPU or CPU slot and its CPU share.

        A job starts when it gets a slot and at least one free core. The free cores are then
        divided among the starting jobs by `divide_cores`, with the jobs ``later(starting)``
        returns (those that could start while these run) as contenders for the slots left idle.
        """
        wave: list[tuple[JobSpec, str | None]] = []
        for job in ready:
            if len(wave) >= len(self._free_cores):
                break
            placed, gpu = self._take_slot(job, self._busy)
            if placed:
                wave.append((job, gpu))
        if not wave:
            return []
        later_needs = self._later_needs(later([j for j, _ in wave]) if later else ())
        shares = divide_cores(len(self._free_cores), [core_need(j, g is not None) for j, g in wave], later_needs)
        free = sorted(self._free_cores)
        out = []
        for (job, gpu), n in zip(wave, shares):
            cpus, free = tuple(free[:n]), free[n:]  # lowest free cores: neighbours share caches
            self._free_cores -= set(cpus)
            out.append((job, Slot(gpu=gpu, cpus=cpus)))
        return out

    def release(self, slot: Slot, job: JobSpec) -> None:
        """Give a finished job's slot and cores back."""
        self._free_cores |= set(slot.cpus)
        if slot.gpu is not None:
            self._busy.gpu_jobs[slot.gpu].remove(self.job_memory_gb(job))
        else:
            self._busy.cpu_jobs -= 1

    def _later_needs(self, later: Sequence[JobSpec]) -> list[int]:
        """Core needs of the ``later`` jobs that would find a slot left idle now (a trial placement)."""
        trial = self._busy.copy()
        needs = []
        for job in later:
            placed, gpu = self._take_slot(job, trial)
            if placed:
                needs.append(core_need(job, gpu is not None))
        return needs

    def _take_slot(self, job: JobSpec, busy: _Occupancy) -> tuple[bool, str | None]:
        """Take a GPU slot (GPU jobs, when there are GPUs) or a CPU slot in ``busy``: (taken, GPU)."""
        if job.needs_gpu and self.cfg.gpus:
            gpu = self._pick_gpu(job, busy)
            if gpu is None:
                return False, None
            busy.gpu_jobs[gpu].append(self.job_memory_gb(job))
            return True, gpu
        if busy.cpu_jobs >= self.cfg.cpu_slots:
            return False, None
        busy.cpu_jobs += 1
        return True, None

    def _pick_gpu(self, job: JobSpec, busy: _Occupancy) -> str | None:
        need = self.job_memory_gb(job)
        budget = None if self.cfg.gpu_memory_gb is None else self.cfg.gpu_memory_gb - (
            GPU_MEMORY_HEADROOM_GB if self.cfg.jobs_per_gpu is None and self.per_gpu_cap > 1 else 0.0)
        best = None
        for g in self.cfg.gpus:
            running = busy.gpu_jobs[g]
            if len(running) >= self.per_gpu_cap:
                continue
            if self.cfg.jobs_per_gpu is None and budget is not None and running and sum(running) + need > budget:
                continue
            if best is None or len(running) < len(busy.gpu_jobs[best]):
                best = g
        return best
