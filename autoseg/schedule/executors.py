"""Executors: how a launched job becomes a running process (local child, Slurm job, or a thread in tests).

The runner decides *what* runs *where* (slot, GPU, CPU share, environment variables); an
executor only starts it and reports back. Each executor returns a `JobHandle` that can be
polled for an exit code, interrupted (the child checkpoints and exits 130) or killed.

This module and ``common/paths.py`` are the only library modules that touch ``os.environ``:
the child's environment is a *copy* of the parent's plus the job's variables, built as a dict;
the parent's environment is never modified.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from autoseg.common.jsonio import atomic_write_json
from autoseg.common.paths import Paths
from autoseg.common.procs import PR_SET_PDEATHSIG, load_libc
from autoseg.schedule.jobs import JobPaths, JobSpec
from autoseg.schedule.resources import Slot
from autoseg.schedule.store import JobRow

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130
"""What `autoseg train` returns after saving a checkpoint on SIGINT/SIGTERM (128 + SIGINT)."""

ORPHAN_GRACE_S = 60.0
"""How long a leftover child of a dead scheduler gets to checkpoint after SIGINT before SIGKILL."""

OMP_WAIT_POLICY = "PASSIVE"
"""OpenMP threads of a job sleep when they run out of work instead of spinning on its cores."""

SLURM_POLL_INTERVAL_S = 5.0
"""At most one sacct query per job this often (sacct is what notices SIGKILLed jobs)."""

SLURM_CHECKPOINT_GRACE_S = 60.0
"""On preemption/timeout, how long the child gets to save its checkpoint before requeue."""


# ---------------------------------------------------------------------- what the runner hands over


@dataclass(frozen=True)
class Launch:
    """Everything needed to start one attempt of a job."""

    job: JobSpec
    command: tuple[str, ...]
    env: dict[str, str]
    """Variables the job gets on top of the inherited environment."""
    job_paths: JobPaths
    slot: Slot | None
    cpus: int
    attempt: int
    after: tuple[str, ...] = ()
    """External ids of still-running dependencies (Slurm ``afterok``); empty for local runs."""


class JobHandle(Protocol):
    """A started attempt."""

    external_id: str

    def poll(self) -> int | None:
        """The exit code once finished (negative: killed by that signal), else None."""

    def interrupt(self) -> None:
        """Ask the job to checkpoint and stop (SIGINT / scancel)."""

    def kill(self) -> None:
        """Stop it now (SIGKILL)."""


class Executor(Protocol):
    """Starts launches; ``uses_slots`` says whether the runner's local slot pool applies."""

    name: str
    uses_slots: bool
    supports_dependencies: bool

    def submit(self, launch: Launch) -> JobHandle:
        """Start one attempt; must not block until it finishes."""

    def reclaim(self, row: JobRow, job_paths: JobPaths) -> JobHandle | None:
        """A job the store says is RUNNING but no scheduler watches: reattach (a handle) or clean up (None)."""


def job_environment(paths: Paths, launch_gpu: str | None, cpus: int, job_paths: JobPaths, job_id: str,
                    num_workers: int, pin_gpu: bool = True) -> dict[str, str]:
    """The variables the scheduler sets for one job: GPU, CPU share, data roots, temp/cache dirs.

    One OpenMP/BLAS thread per core of its share, and threads that sleep when idle
    (``OMP_WAIT_POLICY=PASSIVE``): the main process's threads share those cores with its
    data-loader workers, and spinning ones burn them (one training epoch on a loaded machine:
    238 CPU-seconds with the default spinning threads, 111 with passive ones).
    CPU-only jobs get an empty ``CUDA_VISIBLE_DEVICES`` so they never grab a GPU by accident;
    ``pin_gpu=False`` (Slurm) leaves the variable to the cluster.
    """
    env = {
        **paths.as_env(),
        "OMP_NUM_THREADS": str(cpus),
        "MKL_NUM_THREADS": str(cpus),
        "OPENBLAS_NUM_THREADS": str(cpus),
        "OMP_WAIT_POLICY": OMP_WAIT_POLICY,
        "AUTOSEG_NUM_WORKERS": str(num_workers),
        "TMPDIR": str(job_paths.tmp),
        "TORCHINDUCTOR_CACHE_DIR": str(job_paths.compile_cache),
        "PYTHONUNBUFFERED": "1",
        "PYTHONUTF8": "1",  # text in UTF-8 whatever the locale (torch.compile fails under an ASCII one)
        "AUTOSEG_JOB_ID": job_id,
    }
    if pin_gpu:
        env["CUDA_VISIBLE_DEVICES"] = launch_gpu or ""
    return env


def child_environment(extra: Mapping[str, str], keep_cuda_visible_devices: bool = False) -> dict[str, str]:
    """A copy of this process's environment plus ``extra`` (the parent's is never modified)."""
    env = dict(os.environ)
    for key, value in extra.items():
        if keep_cuda_visible_devices and key == "CUDA_VISIBLE_DEVICES":
            continue
        env[key] = value
    return env


def _log_header(f: IO[bytes], launch: Launch, where: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    f.write(f"=== autoseg scheduler: {launch.job.job_id} attempt {launch.attempt} started {stamp} {where}\n"
            f"=== command: {' '.join(launch.command)}\n".encode())
    f.flush()


# ---------------------------------------------------------------------- local processes


def _preexec(cpus: tuple[int, ...], libc: ctypes.CDLL | None, ignore: tuple[int, ...] = ()) -> Callable[[], None]:
    """Runs in the child before exec: CPU affinity, SIGINT when the scheduler dies, ``ignore``d signals."""

    def run() -> None:
        for sig in ignore:  # an ignored disposition survives exec
            signal.signal(sig, signal.SIG_IGN)
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except (AttributeError, OSError):
                pass  # affinity is best effort (macOS, restricted containers)
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT)

    return run


class LocalHandle:
    """A child process in its own process group (so Ctrl-C reaches it only through us)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.external_id = str(proc.pid)

    def poll(self) -> int | None:
        return self.proc.poll()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def interrupt(self) -> None:
        self._signal(signal.SIGINT)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


class LocalExecutor:
    """One child process per job on this machine, pinned to its GPU and CPU cores."""

    name = "local"
    uses_slots = True
    supports_dependencies = False

    def __init__(self, command_for: Callable[[Launch], list[str]] | None = None) -> None:
        """``command_for`` replaces the job's own argv (benchmarks and tests run stand-in processes)."""
        self.command_for = command_for
        self._libc = load_libc()

    def submit(self, launch: Launch) -> LocalHandle:
        launch.job_paths.make()
        with open(launch.job_paths.log, "ab") as f:
            gpu = launch.slot.gpu if launch.slot else None
            _log_header(f, launch, f"on {socket.gethostname()} GPU {gpu} CPUs {launch.slot.cpus if launch.slot else ()}")
            argv = self.command_for(launch) if self.command_for else list(launch.command)
            proc = subprocess.Popen(argv, env=child_environment(launch.env), stdout=f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=launch.job_paths.folder,
                                    preexec_fn=_preexec(launch.slot.cpus if launch.slot else (), self._libc))
        return LocalHandle(proc)

    def reclaim(self, row: JobRow, job_paths: JobPaths) -> None:
        """Stop a leftover child of a dead scheduler (it checkpoints on SIGINT) so the job can resume."""
        if row.host not in (None, socket.gethostname()) or not row.external_id or not row.external_id.isdigit():
            return None
        pid = int(row.external_id)
        if not _is_our_child_command(pid, row.spec.job_id):
            return None
        log.warning("%s: a process of an earlier run (pid %d) is still alive; interrupting it", row.job_id, pid)
        for sig, wait_s in ((signal.SIGINT, ORPHAN_GRACE_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return None
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if not _alive(pid):
                return None
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


def _is_our_child_command(pid: int, job_id: str) -> bool:
    """Whether ``pid`` is still a process we started (its environment names the job), not a reused pid."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"AUTOSEG_JOB_ID={job_id}".encode() in environ


# ---------------------------------------------------------------------- in-process (tests, benchmarks)


class InProcessHandle:
    def __init__(self, thread: threading.Thread, box: dict[str, int], stop: threading.Event, ident: str) -> None:
        self._thread, self._box, self._stop, self.external_id = thread, box, stop, ident

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else self._box.get("rc", 1)

    def interrupt(self) -> None:
        self._stop.set()

    def kill(self) -> None:
        self._stop.set()


class InProcessExecutor:
    """Runs ``fn(launch, stop_event) -> exit code`` in a thread: scheduler logic without processes."""

    name = "inprocess"
    uses_slots = True
    supports_dependencies = False

    def __init__(self, fn: Callable[[Launch, threading.Event], int]) -> None:
        self.fn = fn
        self._count = 0

    def submit(self, launch: Launch) -> InProcessHandle:
        launch.job_paths.make()
        box: dict[str, int] = {}
        stop = threading.Event()

        def run() -> None:
            try:
                box["rc"] = int(self.fn(launch, stop))
            except Exception as e:
                with open(launch.job_paths.log, "a", encoding="utf-8") as f:
                    f.write(f"{type(e).__name__}: {e}\n")
                box["rc"] = 1

        self._count += 1
        thread = threading.Thread(target=run, name=launch.job.job_id, daemon=True)
        thread.start()
        return InProcessHandle(thread, box, stop, f"thread-{self._count}")

    def reclaim(self, row: JobRow, job_paths: JobPaths) -> None:
        return None


# ---------------------------------------------------------------------- Slurm (submitit)


@dataclass(frozen=True)
class SlurmOptions:
    """Cluster resources per job (``--slurm-*`` options)."""

    partition: str | None = None
    time_min: int = 24 * 60
    mem_gb: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
    """More sbatch options (``{"account": "x"}``)."""


class SlurmCommand:
    """The function submitit runs on the node: the job's argv with its variables, output to its log.

    Slurm's own ``CUDA_VISIBLE_DEVICES`` (the GPU it allocated) is kept. Two ways a running job
    is stopped and requeued, both ending in a run of the same command that resumes through
    ``--continue``:

    - time limit (``--signal=USR2``, or submitit's preemption hook): submitit calls `checkpoint`,
      the child gets SIGINT, saves and exits, and submitit requeues the job;
    - preemption or ``scontrol requeue``: Slurm sends SIGTERM to every process of the job (the
      child saves its checkpoint), SIGKILL after ``KillWait``, and requeues it. Here no result may
      be written, or the scheduler would read the attempt as finished with exit 130 and retry it
      beside the requeued run; Slurm's restart counter tells a requeue from a ``scancel``.
    """

    def __init__(self, command: tuple[str, ...], env: dict[str, str], log_path: str, node_file: str,
                 header: str) -> None:
        self.command, self.env, self.log_path, self.node_file, self.header = command, env, log_path, node_file, header
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop_sent = False

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_proc", "_stop_sent")}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._proc = None
        self._stop_sent = False

    def __call__(self) -> int:
        env = child_environment(self.env, keep_cuda_visible_devices=True)
        restarts = _int_or_zero(os.environ.get("SLURM_RESTART_COUNT"))
        seen = {"node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "restarts": restarts, "pid": os.getpid(),
                "started_at": time.time(), "env": {k: env.get(k) for k in self.env}}
        atomic_write_json(self.node_file, seen)
        terminated = threading.Event()
        previous = self._on_sigterm(terminated)
        try:
            with open(self.log_path, "ab") as f:
                f.write(f"{self.header} on {seen['node']} CUDA_VISIBLE_DEVICES={seen['cuda_visible_devices']} "
                        f"SLURM_JOB_ID={seen['slurm_job_id']} restarts={restarts}\n".encode())
                f.flush()
                self._proc = subprocess.Popen(list(self.command), env=env, stdout=f, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL,
                                              preexec_fn=_preexec((), load_libc(), ignore=(_preemption_signal(),)))
                rc = self._proc.wait()
                requeued = terminated.is_set() and _being_requeued(seen["slurm_job_id"], restarts)
                if requeued:
                    f.write(f"=== Slurm requeues job {seen['slurm_job_id']} (exit {rc}); it resumes from its "
                            "checkpoint when it runs again\n".encode())
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        atomic_write_json(self.node_file, {**seen, "ended_at": time.time(), "exit_code": rc, "requeued": requeued})
        if requeued:
            raise SystemExit(rc)  # no result file: the job is not over, its requeued run will write one
        return rc

    def _on_sigterm(self, terminated: threading.Event) -> object:
        """Note Slurm's SIGTERM (the child got it too, so it must get no second stop signal); old handler."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: object) -> None:
            terminated.set()
            self._stop_sent = True

        return signal.signal(signal.SIGTERM, handler)

    def checkpoint(self) -> object:
        """Preempted or out of time: let the child checkpoint, then requeue the same command.

        Runs in submitit's signal handler while `__call__` sits in ``Popen.wait``, which holds the
        Popen's wait lock: Popen's own poll/wait would see the child running until the grace ran
        out, so the child is watched through /proc.
        """
        import submitit

        if self._proc is not None and _alive(self._proc.pid):
            if not self._stop_sent:  # a second signal would make the trainer abort without saving
                self._stop_sent = True
                os.kill(self._proc.pid, signal.SIGINT)
            deadline = time.monotonic() + SLURM_CHECKPOINT_GRACE_S
            while _alive(self._proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(self._proc.pid):
                os.kill(self._proc.pid, signal.SIGKILL)
        with open(self.log_path, "ab") as f:
            f.write(f"=== checkpointed on Slurm's time-limit/preemption signal; submitit requeues job "
                    f"{os.environ.get('SLURM_JOB_ID')}, which resumes from the checkpoint\n".encode())
        return submitit.helpers.DelayedSubmission(SlurmCommand(self.command, self.env, self.log_path,
                                                               self.node_file, self.header))


def _preemption_signal() -> int:
    """The signal of submitit's checkpoint hook (``--signal=USR2@..``, SUBMITIT_PREEMPT_SIGNAL).

    Slurm sends it to every process of the job; the child must ignore it (its default action
    kills it without a checkpoint) and stop on the SIGINT that `SlurmCommand.checkpoint` sends.
    """
    return int(getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2))


def _int_or_zero(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _being_requeued(slurm_job_id: str | None, restarts_seen: int) -> bool:
    """Whether Slurm is requeueing this job: its restart count went up since this run started.

    ``scancel`` and ``scontrol requeue`` both send SIGTERM; only a requeue bumps ``Restarts``.
    When Slurm cannot be asked, True: without a result, a cancelled job still ends (sacct says
    CANCELLED) while a requeued one must not look finished.
    """
    if not slurm_job_id:
        return False
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", slurm_job_id], capture_output=True, text=True,
                             timeout=30, check=True, encoding="utf-8").stdout
    except (OSError, subprocess.SubprocessError):
        return True
    for token in out.split():
        if token.startswith("Restarts="):
            return _int_or_zero(token.partition("=")[2]) > restarts_seen
    return True


class SlurmHandle:
    """A submitit job; finished when its result exists or sacct says it ended (SIGKILL included)."""

    def __init__(self, job: object) -> None:
        self.job = job
        self.external_id = str(job.job_id)  # type: ignore[attr-defined]
        self._next_check = 0.0

    def poll(self) -> int | None:
        now = time.monotonic()
        force = now >= self._next_check
        if force:
            self._next_check = now + SLURM_POLL_INTERVAL_S
        if not self.job.done(force_check=force):  # type: ignore[attr-defined]
            return None
        try:
            return int(self.job.result())  # type: ignore[attr-defined]
        except Exception as e:
            log.info("slurm job %s ended without result (%s: %s)", self.external_id, type(e).__name__,
                     str(e).splitlines()[0] if str(e) else "")
            return -int(signal.SIGKILL)

    def interrupt(self) -> None:
        self.job.cancel(check=False)  # type: ignore[attr-defined]  # SIGTERM: the trainer checkpoints

    def kill(self) -> None:
        subprocess.run(["scancel", "--signal=KILL", self.external_id], check=False, capture_output=True)
        self.job.cancel(check=False)  # type: ignore[attr-defined]


class SlurmExecutor:
    """One Slurm job per JobSpec through submitit (``--gres=gpu:1`` for GPU jobs, afterok dependencies)."""

    name = "slurm"
    uses_slots = False
    supports_dependencies = True

    def __init__(self, options: SlurmOptions, command_for: Callable[[Launch], list[str]] | None = None) -> None:
        """``command_for`` replaces the job's own argv (tests run stand-in processes)."""
        self.options = options
        self.command_for = command_for

    def submit(self, launch: Launch) -> SlurmHandle:
        import submitit  # lazily: only Slurm runs need it

        launch.job_paths.make()
        ex = submitit.AutoExecutor(folder=launch.job_paths.slurm / "%j", cluster="slurm")
        extra: dict[str, object] = dict(self.options.extra)
        if "no-requeue" not in extra and "no_requeue" not in extra:
            extra.setdefault("requeue", True)  # preemption and `scontrol requeue` rerun it (JobRequeue=0 clusters)
        if launch.after:
            extra["dependency"] = "afterok:" + ":".join(launch.after)
            extra["kill-on-invalid-dep"] = "yes"
        params: dict[str, object] = {
            "timeout_min": self.options.time_min, "name": launch.job.job_id, "cpus_per_task": launch.cpus,
            "slurm_additional_parameters": extra, "slurm_signal_delay_s": 120,
        }
        if launch.job.needs_gpu:
            params["slurm_gres"] = f"gpu:{launch.job.resources.gpus}"
        if self.options.partition:
            params["slurm_partition"] = self.options.partition
        if self.options.mem_gb:
            params["mem_gb"] = self.options.mem_gb
        ex.update_parameters(**params)
        with open(launch.job_paths.log, "ab") as f:
            _log_header(f, launch, "submitted to Slurm")
        stamp = f"=== attempt {launch.attempt} running"
        argv = tuple(self.command_for(launch)) if self.command_for else launch.command
        fn = SlurmCommand(argv, launch.env, str(launch.job_paths.log),
                          str(launch.job_paths.folder / "node.json"), stamp)
        return SlurmHandle(ex.submit(fn))

    def reclaim(self, row: JobRow, job_paths: JobPaths) -> SlurmHandle | None:
        """Reattach to the Slurm job of an earlier run (still queued/running, or its outcome on disk)."""
        if not row.external_id or row.executor != self.name:
            return None
        import submitit

        return SlurmHandle(submitit.SlurmJob(folder=job_paths.slurm / "%j", job_id=row.external_id))
