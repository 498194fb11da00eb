"""The one tracking protocol (`Backend`) and how a backend is picked (`open_backend`).

A backend is a thin, synchronous adapter over a tracker's own client: start or resume a run,
params, metrics at a step, tags, artifacts, end with a status. It may raise anything; the
`autoseg.track.logger.RunLogger` in front of it calls it from a worker thread, retries, buffers
and never lets an exception reach training. Run ids are explicit everywhere (no tracker's global
"active run"), so one process may hold several runs (a sweep's parent and its variants, tests).

The trackers are optional extras (``pip install "autoseg[track]"``), imported only when a run
asks for one; `require_backend` turns a missing one into a one-line `AutosegError`.
"""

from __future__ import annotations

import enum
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from autoseg.common.errors import AutosegError
from autoseg.track.spec import PACKAGES, TrackSpec


class RunStatus(str, enum.Enum):
    """How a run ended (MLflow's names; the other backends map them onto theirs)."""

    FINISHED = "FINISHED"
    FAILED = "FAILED"
    """An exception; its first line is the run's ``error`` tag."""
    KILLED = "KILLED"
    """Interrupted (SIGINT/SIGTERM, `TrainingInterrupted`): ``--continue`` resumes the same run."""


@dataclass(frozen=True)
class RunRequest:
    """What to start: a named run in an experiment (W&B: a group), maybe under a parent, maybe resumed."""

    name: str
    experiment: str
    folder: Path
    """Where the run's local files go (TensorBoard event files, W&B's offline run directory)."""
    parent_id: str | None = None
    resume_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    """One tracker, driven with explicit run ids; every method may raise (the logger handles it)."""

    name: str

    def start(self, request: RunRequest) -> str:
        """Create the run (or reopen ``request.resume_id``) and return its id."""

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Record params; on a resumed run, keys it already holds keep their first value."""

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None) -> None:
        """Metrics at a step (an epoch); ``step=None``: end-of-run values (a summary)."""

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, run_id: str, path: Path, folder: str = "") -> None:
        """Upload one file (into ``folder`` of the run's artifacts)."""

    def end(self, run_id: str, status: RunStatus) -> None: ...

    def is_transient(self, error: BaseException) -> bool:
        """Whether retrying may succeed (server down, database locked, disk full) or the call is refused for good."""

    def close(self) -> None: ...


def missing_package(spec: TrackSpec) -> str | None:
    """The module a backend needs when it is not installed, else None."""
    module = PACKAGES[spec.backend]
    return None if importlib.util.find_spec(module) is not None else module


def require_backend(spec: TrackSpec, where: str = "--track") -> None:
    """Fail in one line, before anything runs, when the tracker's package is not installed."""
    module = missing_package(spec)
    if module is not None:
        raise AutosegError(f"{spec.backend} tracking needs the {module} package: pip install \"autoseg[track]\" "
                           f"(or pip install {module})", where)
