"""Which tracker a run logs to (`TrackSpec`) and what the scheduler tells its children (`TrackContext`).

A spec is one short text, the same on the command line (``--track``), in a sweep file
(``track:``) and in ``$AUTOSEG_TRACK`` (so Slurm and scheduler children inherit it)::

    mlflow                          # sqlite:///<cwd>/mlflow.db, artifacts in <cwd>/mlruns ($AUTOSEG_TRACKING_URI wins)
    mlflow:http://127.0.0.1:5000    # any MLflow tracking URI (server, sqlite:///..., databricks)
    mlflow:/shared/tracking         # a folder: <folder>/mlflow.db, artifacts in <folder>/mlruns
    tensorboard                     # event files beside each fold (fold_k/tensorboard/)
    tensorboard:/shared/tb          # or under one folder, a sub-folder per run
    wandb                           # Weights & Biases project "autoseg"; WANDB_MODE=offline needs no account
    wandb:my-project
    none                            # tracking off (beats $AUTOSEG_TRACK)

`resolve_spec` turns it into an absolute one against the caller's working directory: the
scheduler's children run in their own job folders, so a relative ``./mlflow.db`` would point
each of them somewhere else. Nothing here reads the environment; the CLI hands it in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record

TRACK_ENV = "AUTOSEG_TRACK"
"""The spec for every run started from this environment (scheduler children inherit it)."""

TRACKING_URI_ENV = "AUTOSEG_TRACKING_URI"
"""The MLflow tracking URI when the spec names none (a team's shared server, set once in a profile)."""

CONTEXT_ENV = "AUTOSEG_TRACK_CONTEXT"
"""JSON `TrackContext` a scheduler gives one child: experiment, parent run, tags and params of its sweep variant."""

CHECKPOINTS_ENV = "AUTOSEG_TRACK_CHECKPOINTS"
"""``1``: upload checkpoint_final.pt too (off by default: checkpoints dwarf everything else a run logs)."""

RUN_ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "AUTOSEG_NUM_WORKERS", "AUTOSEG_JOB_ID",
                "SLURM_JOB_ID")
"""Environment variables a fold run records as params (``env.<name>``): where and with what share it ran."""

BACKENDS = ("mlflow", "tensorboard", "wandb")
OFF_WORDS = ("none", "off", "false", "0", "")

MLFLOW_DB = "mlflow.db"
"""The local store's file name: what a bare ``mlflow ui`` opens in the same folder."""

MLFLOW_ARTIFACTS = "mlruns"
"""Local artifacts folder beside the store (``mlflow ui``'s default artifact root too)."""

WANDB_DEFAULT_PROJECT = "autoseg"

PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}
"""The module each backend needs (installed by ``pip install "autoseg[track]"``)."""


@dataclass(frozen=True)
class TrackSpec:
    """A backend and where it writes: an MLflow URI, a TensorBoard folder, a W&B project ('' = default)."""

    backend: str
    target: str = ""
    checkpoints: bool = False
    """Upload ``checkpoint_final.pt`` as an artifact as well."""

    def text(self) -> str:
        """The spec as `parse_track_spec` reads it (what a child gets in ``$AUTOSEG_TRACK``)."""
        return f"{self.backend}:{self.target}" if self.target else self.backend

    @property
    def artifact_root(self) -> Path | None:
        """Local MLflow stores keep artifacts beside the database (``<dir>/mlruns``); None for servers."""
        if self.backend != "mlflow" or not self.target.startswith("sqlite:///"):
            return None
        return Path(self.target[len("sqlite:///"):]).parent / MLFLOW_ARTIFACTS


@dataclass(frozen=True)
class TrackContext:
    """What a run is part of: set by the scheduler for its children, empty for a lone ``autoseg train``."""

    experiment: str | None = None
    """MLflow experiment / W&B group; None: the dataset's name (train-all groups runs by dataset)."""
    parent_run_id: str | None = None
    """The sweep (or sweep variant) run this run nests under."""
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    """E.g. the sweep variant's axes (``sweep.axis.lr``)."""
    environment: dict[str, str] = field(default_factory=dict)
    """The `RUN_ENV_KEYS` this process was started with (filled by the CLI, not passed between processes)."""

    def to_json(self) -> str:
        return json.dumps({"experiment": self.experiment, "parent_run_id": self.parent_run_id,
                           "tags": self.tags, "params": self.params}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = CONTEXT_ENV) -> "TrackContext":
        try:
            data = json.loads(text)
        except ValueError:
            raise AutosegError("not valid JSON", where) from None
        if not isinstance(data, dict) or set(data) - {"experiment", "parent_run_id", "tags", "params"}:
            raise AutosegError("expected an object with experiment, parent_run_id, tags, params", where)
        return cls(experiment=data.get("experiment"), parent_run_id=data.get("parent_run_id"),
                   tags={str(k): str(v) for k, v in (data.get("tags") or {}).items()},
                   params={str(k): str(v) for k, v in (data.get("params") or {}).items()})


@dataclass(frozen=True)
class TrackRequest:
    """A resolved spec plus the context of this one process: everything `train_fold` needs to track."""

    spec: TrackSpec
    context: TrackContext = field(default_factory=TrackContext)


def parse_track_spec(text: str | None, where: str = "--track") -> TrackSpec | None:
    """``mlflow:http://host:5000`` -> ``TrackSpec("mlflow", "http://host:5000")``; None for ``none``/empty."""
    text = (text or "").strip()
    if text.lower() in OFF_WORDS:
        return None
    backend, _, target = text.partition(":")
    backend = backend.strip().lower()
    if backend in ("tb",):
        backend = "tensorboard"
    if backend in ("wb", "weights-and-biases"):
        backend = "wandb"
    if backend not in BACKENDS:
        raise AutosegError(f"unknown tracker {backend!r}; use one of {', '.join(BACKENDS)} "
                           "(optionally BACKEND:TARGET, e.g. mlflow:http://127.0.0.1:5000) or none", where)
    return TrackSpec(backend, target.strip())


def resolve_spec(spec: TrackSpec, cwd: Path, tracking_uri: str | None = None) -> TrackSpec:
    """An absolute spec: local paths made absolute against ``cwd``, MLflow's default store filled in.

    An MLflow target that is a plain path (no ``scheme://``) is a folder holding ``mlflow.db``;
    ``tracking_uri`` (``$AUTOSEG_TRACKING_URI``) is used when the spec names no target.
    """
    target = spec.target
    if spec.backend == "mlflow":
        target = target or (tracking_uri or "").strip()
        if not target:
            target = f"sqlite:///{(cwd / MLFLOW_DB).resolve()}"
        elif target.startswith("sqlite:///") and not target.startswith("sqlite:////"):
            target = f"sqlite:///{(cwd / target[len('sqlite:///'):]).resolve()}"
        elif target.startswith("file://"):
            raise AutosegError("MLflow's file store is retired in MLflow 3; give a folder (mlflow:./tracking) or "
                               "sqlite:///path/mlflow.db", "--track")
        elif "://" not in target and not target.startswith(("databricks", "uc")):
            target = f"sqlite:///{(cwd / target / MLFLOW_DB).resolve()}"
    elif spec.backend == "tensorboard" and target:
        target = str((cwd / target).resolve())
    return TrackSpec(spec.backend, target, spec.checkpoints)


def track_request_from_env(env: Mapping[str, str], option: str | None, cwd: Path,
                           file_value: str | None = None) -> TrackRequest | None:
    """The run's tracking: ``--track`` > a sweep file's ``track:`` > ``$AUTOSEG_TRACK``; None when off.

    The CLI calls this with ``os.environ``; a child of the scheduler also gets its `TrackContext`
    (``$AUTOSEG_TRACK_CONTEXT``) and every process records the `RUN_ENV_KEYS` it was given.
    """
    where = "--track" if option is not None else ("track" if file_value is not None else TRACK_ENV)
    chosen = option if option is not None else (file_value if file_value is not None else env.get(TRACK_ENV))
    spec = parse_track_spec(chosen, where)
    if spec is None:
        return None
    checkpoints = env.get(CHECKPOINTS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    spec = resolve_spec(TrackSpec(spec.backend, spec.target, checkpoints), cwd, env.get(TRACKING_URI_ENV))
    context = TrackContext.from_json(env[CONTEXT_ENV]) if env.get(CONTEXT_ENV) else TrackContext()
    environment = {k: env[k] for k in RUN_ENV_KEYS if k in env}
    environment.setdefault("CUDA_VISIBLE_DEVICES", "unset")  # unset: every GPU visible, worth knowing
    return TrackRequest(spec, TrackContext(context.experiment, context.parent_run_id, context.tags,
                                           context.params, environment))


def child_env(spec: TrackSpec | None, context: TrackContext | None = None) -> dict[str, str]:
    """The variables a scheduled child needs to log into the same tracker (and under its parent run).

    ``spec=None`` switches tracking off in the child: an inherited ``$AUTOSEG_TRACK`` would make it
    track, relative to its own working directory (the CLI resolved the parent's into ``spec`` already).
    """
    if spec is None:
        return {TRACK_ENV: "none", CONTEXT_ENV: ""}
    env = {TRACK_ENV: spec.text()}
    if spec.checkpoints:
        env[CHECKPOINTS_ENV] = "1"
    if context is not None:
        env[CONTEXT_ENV] = context.to_json()
    return env


def flat_params(prefix: str, values: Mapping[str, Any]) -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>a.b": "1"}``: trackers take flat string params."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flat_params(f"{prefix}{key}.", value))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


_Record = TypeVar("_Record")


def load_same_tracker(file: Path, record_type: type[_Record], spec: TrackSpec, what: str) -> _Record | None:
    """The ``tracking.json`` record in ``file`` when it was written for ``spec``'s tracker, else None.

    A run resumes only in the tracker it started in: an unreadable record, or one naming another
    backend or target, means ``what`` starts new runs (said in the log).
    """
    if not file.is_file():
        return None
    try:
        record = load_record(file, record_type)
    except AutosegError as e:
        logging.getLogger(__name__).warning("%s; %s starts new runs", e, what)
        return None
    if (record.backend, record.target) != (spec.backend, spec.target):
        logging.getLogger(__name__).info("%s names another tracker (%s %s); %s starts new runs", file,
                                         record.backend, record.target, what)
        return None
    return record
