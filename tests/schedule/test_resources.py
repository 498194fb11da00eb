"""Slots, CPU shares and packing."""

from __future__ import annotations

import pytest

from autoseg.common.errors import AutosegError
from autoseg.schedule.jobs import JobKind, JobSpec, Resources
from autoseg.schedule.resources import PoolConfig, Slot, SlotPool, parse_folds, parse_gpus


def _train(fold: int, mem: float | None = None) -> JobSpec:
    return JobSpec.make(JobKind.TRAIN, "D", config="3d_fullres", fold=fold, resources=Resources(gpus=1, gpu_memory_gb=mem))


def _acquire(pool: SlotPool, job: JobSpec) -> Slot | None:
    """One job's slot when it starts alone (None: it has to wait)."""
    got = pool.acquire([job])
    return got[0][1] if got else None


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
    slots = [_acquire(pool, _train(k)) for k in range(4)]
    cpu = _acquire(pool, JobSpec.make(JobKind.PLAN, "D"))
    taken = [c for s in slots + [cpu] for c in s.cpus]
    assert len(taken) == len(set(taken)) <= 16
    assert {s.gpu for s in slots} == {"0", "1", "2", "3"}
    assert _acquire(pool, _train(5)) is None  # every GPU busy
    pool.release(slots[2], _train(2))
    assert _acquire(pool, _train(5)).gpu == "2"


def test_more_slots_than_cores_caps_concurrency() -> None:
    pool = SlotPool(PoolConfig(gpus=("0", "1", "2", "3"), cores=(0, 1)))
    got = [slot for _, slot in pool.acquire([_train(k) for k in range(4)])]
    assert len(got) == 2 and sorted(c for s in got for c in s.cpus) == [0, 1]  # one core each
    assert pool.acquire([_train(5)]) == []


def test_packing_by_memory_estimate_and_fixed() -> None:
    by_memory = SlotPool(PoolConfig(gpus=("0",), gpu_memory_gb=24.0, cores=tuple(range(8))))
    small = [_acquire(by_memory, _train(k, mem=7.0)) for k in range(4)]
    assert [s is not None for s in small] == [True, True, True, False]  # 3 x 7 GB <= 24 - 1 GB headroom
    unknown = SlotPool(PoolConfig(gpus=("0",), gpu_memory_gb=24.0, cores=tuple(range(8))))
    assert _acquire(unknown, _train(0)) is not None and _acquire(unknown, _train(1)) is None
    fixed = SlotPool(PoolConfig(gpus=("0", "1"), jobs_per_gpu=2, cores=tuple(range(8))))
    gpus = [_acquire(fixed, _train(k)).gpu for k in range(4)]
    assert sorted(gpus) == ["0", "0", "1", "1"] and _acquire(fixed, _train(9)) is None


def test_gpu_jobs_without_gpus_run_on_cpu_slots() -> None:
    pool = SlotPool(PoolConfig(gpus=(), cpu_slots=2, cores=(0, 1)))
    (_, a), (_, b) = pool.acquire([_train(0), _train(1), _train(2)])  # two CPU slots, one core each
    assert a.gpu is None and b.gpu is None and {a.cpus, b.cpus} == {(0,), (1,)}
    assert _acquire(pool, _train(2)) is None
