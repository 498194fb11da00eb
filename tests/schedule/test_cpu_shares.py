"""CPU shares that follow the jobs (16 fake cores, 4 fake GPUs): who gets how many cores, workers and threads."""

from __future__ import annotations

import threading
import time

import pytest
from click.testing import CliRunner

import autoseg.cli
import autoseg.schedule.train_all as train_all_module
from autoseg.common.errors import ConfigError
from autoseg.common.jsonio import load_record
from autoseg.data.augment import AUGMENT_DEVICES, resolve_augment_device
from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset
from autoseg.schedule.executors import InProcessExecutor, Launch
from autoseg.schedule.graph import TrainAllRequest
from autoseg.schedule.jobs import JobKind, JobPaths, JobRecord, JobSpec, JobState, Resources
from autoseg.schedule.resources import (CPU_AUGMENT_CORES, DEVICE_AUGMENT_CORES, PROCESS_POOL_CORES, PoolConfig,
                                        SlotPool, augment_device, core_need, divide_cores, format_cores,
                                        requested_augment_device)
from autoseg.schedule.order import num_workers_for, simulate_schedule
from autoseg.schedule.runner import RunOptions, run_locked
from autoseg.schedule.status import collect_status
from autoseg.schedule.store import StateStore
from autoseg.schedule.train_all import TrainAllOptions, preview
from tests.schedule.conftest import DATASET

CORES = tuple(range(16))
GPUS = ("0", "1", "2", "3")


def _train(fold: int, device: str | None = None, duration: float | None = None) -> JobSpec:
    """A training on one GPU, ``--set augment.device=<device>`` when given."""
    overrides = (f"augment.device={device}",) if device else ()
    return JobSpec.make(JobKind.TRAIN, DATASET, config="3d_fullres", fold=fold, trainer_overrides=overrides,
                        resources=Resources(gpus=1, est_duration_s=duration))


def _mix(n: int, mix: str) -> list[JobSpec]:
    """``n`` trainings augmenting on the GPU (device), in CPU workers (cpu) or alternating (mixed)."""
    devices = {"device": ["auto"], "cpu": ["cpu"], "mixed": ["auto", "cpu"]}[mix]
    return [_train(k, devices[k % len(devices)], duration=100.0 + 37 * ((k * 7) % 5)) for k in range(n)]


def test_augment_device_rule_and_core_needs() -> None:
    assert requested_augment_device(()) == "auto"
    assert requested_augment_device(("lr=0.1", " augment.device = cpu", "augment.device=device")) == "device"
    assert augment_device(_train(0), on_gpu=True) == "device"  # auto on a GPU
    assert augment_device(_train(0), on_gpu=False) == "cpu"  # auto on a CPU slot
    assert augment_device(_train(0, "cpu"), on_gpu=True) == "cpu"
    assert augment_device(JobSpec.make(JobKind.PLAN, DATASET), on_gpu=False) is None
    assert core_need(_train(0), on_gpu=True) == DEVICE_AUGMENT_CORES == 2
    assert core_need(_train(0, "cpu"), on_gpu=True) == CPU_AUGMENT_CORES == 13  # nnU-Net's 12 workers + main
    assert core_need(_train(0), on_gpu=False) == CPU_AUGMENT_CORES  # the network runs on the CPU too
    assert core_need(JobSpec.make(JobKind.PREPROCESS, DATASET), on_gpu=False) == PROCESS_POOL_CORES
    assert format_cores((0, 1, 2, 3, 8, 10, 11)) == "0-3,8,10-11"
    assert [resolve_augment_device(d, kind) for d in AUGMENT_DEVICES for kind in ("cuda", "cpu")] == [
        "device", "cpu", "cpu", "cpu", "device", "device"]  # the trainer's rule: auto follows the device
    with pytest.raises(ConfigError, match="augment.device"):
        resolve_augment_device("gpu", "cuda")


def test_divide_cores_examples() -> None:
    assert divide_cores(16, [13]) == [13]  # a lone job: its full need
    assert divide_cores(16, [2]) == [2]
    assert divide_cores(16, [13] * 4) == [4, 4, 4, 4]
    assert divide_cores(16, [2, 13, 2, 13]) == [2, 6, 2, 6]  # max-min fair, capped by need
    assert divide_cores(16, [2] * 16 + []) == [1] * 16
    assert divide_cores(5, [13, 13, 13]) == [2, 2, 1]  # one worker each while cores last, by priority
    # three jobs that could start into idle slots meanwhile keep their fair share free
    assert divide_cores(16, [8], later_needs=[13, 13, 13]) == [4]
    assert divide_cores(16, [8], later_needs=[2, 2, 2, 2]) == [8]
    # ... but never at the cost of a starting job's first worker
    assert divide_cores(4, [13, 13], later_needs=[13] * 6) == [2, 2]
    with pytest.raises(ValueError):
        divide_cores(2, [2, 2, 2])


def test_divide_cores_properties() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(2000):
        free = int(rng.integers(1, 33))
        needs = [int(x) for x in rng.choice([1, 2, 8, 13], size=int(rng.integers(1, free + 1)))]
        later = [int(x) for x in rng.choice([2, 13], size=int(rng.integers(0, 6)))]
        shares = divide_cores(free, needs, later)
        assert sum(shares) <= free and all(1 <= s <= max(1, n) for s, n in zip(shares, needs))
        if any(s < min(n, 2) for s, n in zip(shares, needs)):
            assert sum(shares) == free  # a job lacks a worker only when no core is left
        if not later:
            assert sum(shares) == min(free, sum(needs))  # nothing kept back without later jobs
            below = [s for s, n in zip(shares, needs) if s < n]
            assert not below or max(shares) <= min(below) + 1 or max(shares) <= 2  # max-min fair


@pytest.mark.parametrize("jobs_per_gpu", [None, 4])
@pytest.mark.parametrize("mix", ["device", "cpu", "mixed"])
def test_shares_on_16_cores_and_4_gpus(mix: str, jobs_per_gpu: int | None) -> None:
    """1..16 trainings, the runner's placement (simulate_schedule): disjoint, within the machine, workers
    whenever a core is free, a lone job gets its full need, and finished jobs give their cores back."""
    pool = PoolConfig(gpus=GPUS, jobs_per_gpu=jobs_per_gpu, cores=CORES)
    for n in range(1, 17):
        jobs = _mix(n, mix)
        placed = simulate_schedule(jobs, pool)
        by_id = {j.job_id: j for j in jobs}
        assert sorted(a.job_id for a in placed) == sorted(by_id)
        for a in placed:
            need = core_need(by_id[a.job_id], on_gpu=True)
            assert a.gpu in GPUS and 1 <= a.cpus == len(a.cores) <= need and set(a.cores) <= set(CORES)
            assert a.workers == a.cpus - 1 == num_workers_for(by_id[a.job_id], a.cpus)
            running = [b for b in placed if b.start_s <= a.start_s < b.end_s]
            held = [c for b in running for c in b.cores]
            assert len(held) == len(set(held)) <= len(CORES)  # shares never overlap
            if a.workers == 0:
                assert len(held) == len(CORES), (n, a)  # 0 workers only when every core is taken
            per_gpu = max(sum(b.gpu == g for b in running) for g in GPUS)
            assert per_gpu <= (jobs_per_gpu or 1)
        if n == 1:
            assert placed[0].cpus == core_need(jobs[0], on_gpu=True)  # a lone job: its full need
        first = [a for a in placed if a.start_s == 0]
        assert len(first) == min(n, 4 * (jobs_per_gpu or 1))
        if mix == "cpu" and jobs_per_gpu is None and n >= 4:
            assert [a.cpus for a in first] == [4, 4, 4, 4]  # 16 cores fairly among 4 CPU-augmented
        if mix == "device":
            assert all(a.cpus in (1, 2) for a in first) and sum(a.cpus for a in first) == min(16, 2 * len(first))
        later = [a for a in placed if a.start_s > 0]
        if mix == "cpu" and jobs_per_gpu is None:
            assert all(a.cpus == 4 for a in later)  # each takes over the cores of the job it follows


def test_cores_come_back_on_finish() -> None:
    pool = SlotPool(PoolConfig(gpus=GPUS, cores=CORES))
    wave = pool.acquire([_train(k, "cpu") for k in range(6)])
    assert [len(s.cpus) for _, s in wave] == [4, 4, 4, 4] and pool.free_cores == ()
    for job, slot in wave:
        pool.release(slot, job)
    assert pool.free_cores == CORES
    (job, slot), = pool.acquire([_train(9, "cpu")])
    assert len(slot.cpus) == CPU_AUGMENT_CORES  # alone again: its full need
    (plan, cpu_slot), = pool.acquire([JobSpec.make(JobKind.PLAN, DATASET)])
    assert cpu_slot.gpu is None and len(cpu_slot.cpus) == 3 and not set(cpu_slot.cpus) & set(slot.cpus)


def test_cores_are_kept_for_jobs_that_may_start_meanwhile() -> None:
    """A plan job alone while another dataset's four CPU-augmented trainings could start into idle GPUs."""
    plan = JobSpec.make(JobKind.PLAN, DATASET)
    others = [_train(k, "cpu") for k in range(4)]
    pool = SlotPool(PoolConfig(gpus=GPUS, cores=CORES))
    (_, slot), = pool.acquire([plan], later=lambda starting: others)
    assert len(slot.cpus) == 4  # 16 cores fairly among the plan job and the four trainings
    pool.release(slot, plan)
    (_, slot), = pool.acquire([plan], later=lambda starting: [])
    assert len(slot.cpus) == PROCESS_POOL_CORES  # nothing else could start: its full need


def _run_recording(sched_paths, jobs: list[JobSpec], pool: PoolConfig, during=None) -> dict[str, Launch]:
    """Run ``jobs`` in threads; every start checks that no running job holds one of its cores."""
    held: set[int] = set()
    lock = threading.Lock()
    launches: dict[str, Launch] = {}

    def fn(launch: Launch, stop: threading.Event) -> int:
        cores = set(launch.slot.cpus)
        with lock:
            assert not cores & held, (launch.job.job_id, cores & held)
            held.update(cores)
            launches[launch.job.job_id] = launch
        try:
            if during is not None:
                during(launch)
            time.sleep(0.05)
        finally:
            with lock:
                held.difference_update(cores)
        return 0

    summary = run_locked(sched_paths, jobs, InProcessExecutor(fn), RunOptions(pool=pool, poll_interval_s=0.01))
    assert summary.ok, summary.one_line()
    return launches


def test_runner_gives_disjoint_shares_and_the_child_environment(sched_paths) -> None:
    jobs = _mix(10, "mixed")
    seen: dict[str, list] = {}

    def during(launch: Launch) -> None:  # `autoseg status` while the job runs shows its share
        if launch.job.job_id == jobs[0].job_id:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                mine = [s for s in collect_status(sched_paths) if s.job_id == launch.job.job_id]
                if mine and mine[0].state is JobState.RUNNING:
                    seen["status"] = mine
                    return
                time.sleep(0.02)

    launches = _run_recording(sched_paths, jobs, PoolConfig(gpus=GPUS, cores=CORES), during)
    assert sorted(launches) == sorted(j.job_id for j in jobs)
    for job in jobs:
        launch = launches[job.job_id]
        n = len(launch.slot.cpus)
        workers = n - 1
        assert launch.env["OMP_NUM_THREADS"] == launch.env["MKL_NUM_THREADS"] == str(n) == str(launch.cpus)
        assert launch.env["OMP_WAIT_POLICY"] == "PASSIVE"
        assert launch.env["AUTOSEG_NUM_WORKERS"] == str(workers) and launch.env["CUDA_VISIBLE_DEVICES"] in GPUS
        argv = list(launch.command)
        assert argv[argv.index("--num-workers") + 1] == str(workers)
        record = load_record(JobPaths.of(sched_paths, job.job_id).record, JobRecord)
        assert record.cores == launch.slot.cpus and record.workers == workers
        assert record.augment_device == augment_device(job, on_gpu=True)
        assert 1 <= n <= core_need(job, on_gpu=True)
    with StateStore.open(sched_paths, readonly=True) as store:
        rows = {r.job_id: r for r in store.rows()}
    assert all(rows[j.job_id].workers == len(launches[j.job_id].slot.cpus) - 1 for j in jobs)
    (status,) = seen["status"]
    assert status.cpus == len(launches[jobs[0].job_id].slot.cpus) and status.workers == status.cpus - 1
    # the first wave (the four longest): device-augmented ones 2 cores, CPU-augmented ones the rest, fairly
    first = sorted(jobs, key=lambda j: -j.resources.est_duration_s)[:4]
    assert sorted(augment_device(j, on_gpu=True) for j in first) == ["cpu", "cpu", "device", "device"]
    assert {j.job_id: len(launches[j.job_id].slot.cpus) for j in first} == {
        j.job_id: 6 if augment_device(j, on_gpu=True) == "cpu" else 2 for j in first}


def test_a_lone_job_gets_its_full_need_in_a_real_run(sched_paths) -> None:
    (job,) = _mix(1, "cpu")
    launches = _run_recording(sched_paths, [job], PoolConfig(gpus=GPUS, cores=CORES))
    assert len(launches[job.job_id].slot.cpus) == CPU_AUGMENT_CORES
    assert launches[job.job_id].env["AUTOSEG_NUM_WORKERS"] == str(CPU_AUGMENT_CORES - 1)


def _cli(paths, *args: str):
    return CliRunner().invoke(autoseg.cli.cli, ["--raw", str(paths.raw), "--preprocessed", str(paths.preprocessed),
                                                "--results", str(paths.results), *args])


def test_dry_run_shows_the_first_wave_shares(sched_paths, monkeypatch) -> None:
    monkeypatch.setattr(train_all_module, "machine_cores", lambda: CORES)
    make_phantom_dataset(sched_paths.raw, PhantomRecipe(num_training=5, num_test=0, shape=(8, 16, 16)))
    for verb in ("plan", "preprocess"):
        done = _cli(sched_paths, verb, DATASET, "--configs", "3d_fullres")
        assert done.exit_code == 0, done.output
    for setting, cpus, workers, device in (((), "2", "1", "device"), (("--set", "augment.device=cpu"), "4", "3", "cpu")):
        result = _cli(sched_paths, "train-all", "--configs", "3d_fullres", "--gpus", ",".join(GPUS), "--dry-run",
                      *setting)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["job", "GPU", "CPUs", "workers", "augment", "start", "after"]
        rows = {line.split()[0]: line.split() for line in lines[2:8]}
        first = [r for r in rows.values() if r[0].startswith("train:") and r[5] == "0s"]
        assert len(first) == 4 and sorted(r[1] for r in first) == list(GPUS)
        assert all(r[2:5] == [cpus, workers, device] for r in first), first
        assert "CPU shares are decided as jobs start" in result.stdout


def test_plan_job_plans_for_the_memory_of_the_given_gpus(sched_paths, monkeypatch) -> None:
    make_phantom_dataset(sched_paths.raw, PhantomRecipe(num_training=5, num_test=0, shape=(8, 16, 16)))
    asked = []
    monkeypatch.setattr(train_all_module, "query_gpu_memory_gb", lambda gpus: asked.append(gpus) or 23.6)
    request = TrainAllRequest(datasets=(DATASET,), configs=("3d_fullres",), folds=(0,))

    def plan_argv(options: TrainAllOptions) -> list[str]:
        jobs, _ = preview(sched_paths, options)
        (plan,) = [j for j in jobs if j.kind is JobKind.PLAN]
        return plan.command(sched_paths)

    argv = plan_argv(TrainAllOptions(request=request, gpus=("1", "3"), fake_gpus=True))
    assert argv[argv.index("--gpu-memory") + 1] == "23.6" and ("1", "3") in asked
    asked.clear()
    given = TrainAllRequest(datasets=(DATASET,), configs=("3d_fullres",), folds=(0,), gpu_memory_gb=11.0)
    argv = plan_argv(TrainAllOptions(request=given, gpus=("1", "3"), fake_gpus=True))
    assert argv[argv.index("--gpu-memory") + 1] == "11"
    slurm = TrainAllOptions(request=request, executor="slurm")
    assert "--gpu-memory" not in plan_argv(slurm)  # the cluster's GPUs are unknown here
    result = _cli(sched_paths, "train-all", "--configs", "3d_fullres", "--folds", "0", "--gpus", "0,1", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"plan:{DATASET} plans for 23.6 GB of GPU memory" in result.stdout
