"""Slots, CPU shares and packing."""

from __future__ import annotations

import pytest

from autoseg.common.errors import AutosegError
from autoseg.schedule.jobs import JobKind, JobSpec, Resources
from autoseg.schedule.resources import PoolConfig, SlotPool, parse_folds, parse_gpus


def _train(fold: int, mem: float | None = None) -> JobSpec:
    return JobSpec.make(JobKind.TRAIN, "D", config="3d_fullres", fold=fold, resources=Resources(gpus=1, gpu_memory_gb=mem))


def test_parse_folds_and_gpus() -> None:
    assert parse_folds("0-4") == (0, 1, 2, 3, 4)
    assert parse_folds("0,2,all") == (0, 2, "all")
    assert parse_gpus("0, 1,2") == ("0", "1", "2")
    with pytest.raises(AutosegError, match="--folds"):
        parse_folds("x")
    with pytest.raises(AutosegError, match="twice"):
        parse_gpus("0,0")


def test_cpu_shares_are_disjoint_and_fit_the_machine() -> None:
    pool = SlotPool(PoolConfig(gpus=("0", "1", "2", "3"), cpu_slots=1, cores=tuple(range(16))))
    slots = [pool.acquire(_train(k)) for k in range(4)]
    cpu = pool.acquire(JobSpec.make(JobKind.PLAN, "D"))
    taken = [c for s in slots + [cpu] for c in s.cpus]
    assert len(taken) == len(set(taken)) <= 16
    assert {s.gpu for s in slots} == {"0", "1", "2", "3"}
    assert pool.acquire(_train(5)) is None  # every GPU busy
    pool.release(slots[2], _train(2))
    assert pool.acquire(_train(5)).gpu == "2"


def test_more_slots_than_cores_caps_concurrency() -> None:
    pool = SlotPool(PoolConfig(gpus=("0", "1", "2", "3"), cores=(0, 1)))
    got = [pool.acquire(_train(k)) for k in range(4)]
    assert sum(s is not None for s in got) == 2
    assert sum(len(s.cpus) for s in got if s) <= 2


def test_packing_by_memory_estimate_and_fixed() -> None:
    by_memory = SlotPool(PoolConfig(gpus=("0",), gpu_memory_gb=24.0, cores=tuple(range(8))))
    small = [by_memory.acquire(_train(k, mem=7.0)) for k in range(4)]
    assert [s is not None for s in small] == [True, True, True, False]  # 3 x 7 GB <= 24 - 1 GB headroom
    unknown = SlotPool(PoolConfig(gpus=("0",), gpu_memory_gb=24.0, cores=tuple(range(8))))
    assert unknown.acquire(_train(0)) is not None and unknown.acquire(_train(1)) is None
    fixed = SlotPool(PoolConfig(gpus=("0", "1"), jobs_per_gpu=2, cores=tuple(range(8))))
    gpus = [fixed.acquire(_train(k)).gpu for k in range(4)]
    assert sorted(gpus) == ["0", "0", "1", "1"] and fixed.acquire(_train(9)) is None


def test_gpu_jobs_without_gpus_run_on_cpu_slots() -> None:
    pool = SlotPool(PoolConfig(gpus=(), cpu_slots=2, cores=(0, 1)))
    a, b = pool.acquire(_train(0)), pool.acquire(_train(1))
    assert a.gpu is None and b.gpu is None and pool.acquire(_train(2)) is None
