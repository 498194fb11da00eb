"""GPU slots, CPU shares and packing: who runs where, with how many cores.

Every concurrently running job gets a disjoint group of CPU cores (its affinity, thread count
and data-loader workers), so shares never sum to more than the machine's cores: four jobs on a
16-core machine get 4 cores each instead of starting 16 workers each and starving each other.
GPU jobs take a slot on one GPU; several jobs share a GPU only with ``--jobs-per-gpu`` or when
the plan's memory estimates show they fit (``--gpu-memory`` or the device's memory).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from autoseg.common.errors import AutosegError
from autoseg.schedule.jobs import JobSpec

log = logging.getLogger(__name__)

AUTO_PACK_MAX_JOBS_PER_GPU = 4
"""Automatic packing never puts more than this many trainings on one GPU (CPU-side limits dominate)."""

GPU_MEMORY_HEADROOM_GB = 1.0
"""Kept free per GPU when packing by memory estimates (CUDA context, allocator fragmentation)."""

NNUNET_FOLDS = 5
"""nnU-Net's cross-validation: five folds, 0..4."""

GPU_ID_RE = re.compile(r"^(?:\d+|(?:GPU|MIG)-[0-9A-Za-z][0-9A-Za-z/-]*)$")
"""What ``CUDA_VISIBLE_DEVICES`` accepts: device indices (0, 1, ...) or GPU-/MIG- UUIDs."""


def machine_cores() -> tuple[int, ...]:
    """The CPU cores this process may use (its affinity mask, which respects cgroups/taskset)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return tuple(range(os.cpu_count() or 1))


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


class SlotPool:
    """Hands out GPU slots and disjoint CPU core groups to jobs; the runner's only notion of a machine."""

    def __init__(self, cfg: PoolConfig) -> None:
        if cfg.jobs_per_gpu is not None and cfg.jobs_per_gpu < 1:
            raise AutosegError("must be at least 1", "--jobs-per-gpu")
        if cfg.cpu_slots < 1:
            raise AutosegError("must be at least 1", "-j")
        self.cfg = cfg
        self.per_gpu_cap = cfg.jobs_per_gpu or (AUTO_PACK_MAX_JOBS_PER_GPU if cfg.gpu_memory_gb else 1)
        wanted = len(cfg.gpus) * self.per_gpu_cap + cfg.cpu_slots
        self.max_concurrent = max(1, min(wanted, len(cfg.cores)))
        if wanted > len(cfg.cores):
            log.warning("%d job slots but only %d CPU cores: running at most %d jobs at once so CPU shares "
                        "do not overlap", wanted, len(cfg.cores), self.max_concurrent)
        self.cpus_per_job = max(1, len(cfg.cores) // self.max_concurrent)
        groups = [cfg.cores[i * self.cpus_per_job:(i + 1) * self.cpus_per_job] for i in range(self.max_concurrent)]
        self._free_groups: list[tuple[int, ...]] = groups
        self._gpu_jobs: dict[str, list[float]] = {g: [] for g in cfg.gpus}
        self._cpu_jobs = 0

    def job_memory_gb(self, job: JobSpec) -> float:
        """Memory a job is assumed to take on its GPU (a whole GPU when unknown)."""
        if self.cfg.gpu_memory_gb is None:
            return 0.0
        need = job.resources.gpu_memory_gb
        return self.cfg.gpu_memory_gb if not need else need

    def acquire(self, job: JobSpec) -> Slot | None:
        """A free slot for ``job``, or None when it has to wait."""
        if not self._free_groups:
            return None
        gpu: str | None = None
        if job.needs_gpu and self.cfg.gpus:
            gpu = self._pick_gpu(job)
            if gpu is None:
                return None
            self._gpu_jobs[gpu].append(self.job_memory_gb(job))
        else:
            if self._cpu_jobs >= self.cfg.cpu_slots:
                return None
            self._cpu_jobs += 1
        return Slot(gpu=gpu, cpus=self._free_groups.pop(0))

    def release(self, slot: Slot, job: JobSpec) -> None:
        self._free_groups.append(slot.cpus)
        if slot.gpu is not None:
            self._gpu_jobs[slot.gpu].remove(self.job_memory_gb(job))
        else:
            self._cpu_jobs -= 1

    def _pick_gpu(self, job: JobSpec) -> str | None:
        need = self.job_memory_gb(job)
        budget = None if self.cfg.gpu_memory_gb is None else self.cfg.gpu_memory_gb - (
            GPU_MEMORY_HEADROOM_GB if self.cfg.jobs_per_gpu is None and self.per_gpu_cap > 1 else 0.0)
        best = None
        for g in self.cfg.gpus:
            running = self._gpu_jobs[g]
            if len(running) >= self.per_gpu_cap:
                continue
            if self.cfg.jobs_per_gpu is None and budget is not None and running and sum(running) + need > budget:
                continue
            if best is None or len(running) < len(self._gpu_jobs[best]):
                best = g
        return best
