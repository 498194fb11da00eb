"""MLflow, the first-class backend: `MlflowClient` with explicit run ids, no global active run.

Any tracking URI works (``http://`` server, ``sqlite:///``, Databricks). A local sqlite store
keeps its artifacts beside the database (``<dir>/mlruns/<experiment>``), set per experiment, so
they land there whatever the working directory of the process that creates it (the
scheduler's children run in their job folders). Creating a new sqlite store runs MLflow's schema
migrations, which several processes starting at once would race on: that happens under a file
lock beside the database. Nested runs carry MLflow's ``mlflow.parentRunId`` tag, which the UI
shows as a tree.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import math
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from autoseg.common.procs import fork_private
from autoseg.track.base import RunRequest, RunStatus
from autoseg.track.spec import TrackSpec

DATABASE_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")
"""Tracking URIs MLflow serves from a database in this process (the others go through its REST client)."""

PARENT_TAG = "mlflow.parentRunId"
"""The tag MLflow's UI nests runs by."""

MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_TAGS_PER_BATCH = 100
"""MLflow's per-request limits of ``log_batch``."""

MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 8000
"""MLflow's value length limits (longer values are cut, not refused)."""

PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                              "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED",
                              "FEATURE_DISABLED", "ENDPOINT_NOT_FOUND"})
"""MLflow error codes that no retry will change; everything else (connection refused, a locked
database, a 5xx) is worth retrying."""

CHANGED_PARAM_TAG = "autoseg.resumed_with."
"""A resumed run may be given other values for environment params (device, workers): MLflow
refuses to change a param, so the new value becomes this tag."""


class MlflowBackend:
    """`autoseg.track.base.Backend` over `mlflow.MlflowClient` (imported when the backend is made)."""

    name = "mlflow"

    def __init__(self, spec: TrackSpec) -> None:
        from mlflow import MlflowClient  # the optional extra: imported here, in the caller's thread
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException

        # the store's module is seconds of imports (and ORM set-up): here, not later in the worker thread
        importlib.import_module("mlflow.store.tracking." + (
            "sqlalchemy_store" if spec.target.startswith(DATABASE_SCHEMES) else "rest_store"))
        self.spec = spec
        self._client_class, self._exception = MlflowClient, MlflowException
        self._entities = (Metric, Param, RunTag)
        self._client_obj: Any = None
        self._experiments: dict[str, str] = {}

    # ------------------------------------------------------------------ the client
    def client(self) -> Any:
        """The `MlflowClient` (made on first use, in the logger's worker: a new sqlite store takes seconds)."""
        if self._client_obj is None:
            with _store_lock(self.spec):
                client = self._client_class(tracking_uri=self.spec.target)
                client.search_experiments(max_results=1)  # creates (migrates) a local store now, under the lock
            self._client_obj = client
        return self._client_obj

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (or restored from MLflow's trash) when needed."""
        if name in self._experiments:
            return self._experiments[name]
        client = self.client()
        found = client.get_experiment_by_name(name)
        if found is None:
            root = self.spec.artifact_root
            location = (root / safe_folder(name)).as_uri() if root is not None else None
            try:
                client.create_experiment(name, artifact_location=location)
            except self._exception as e:  # another process created it first
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            found = client.get_experiment_by_name(name)
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        self._experiments[name] = found.experiment_id
        return found.experiment_id

    # ------------------------------------------------------------------ Backend
    def start(self, request: RunRequest) -> str:
        client = self.client()
        if request.resume_id:
            try:
                client.get_run(request.resume_id)
            except self._exception as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            else:
                client.update_run(request.resume_id, status="RUNNING")
                return request.resume_id
        tags = dict(request.tags)
        if request.parent_id:
            tags[PARENT_TAG] = request.parent_id
        run = client.create_run(self.experiment_id(request.experiment), run_name=request.name,
                                tags={k: _cut(v, MAX_TAG_CHARS) for k, v in tags.items()})
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        client = self.client()
        held = client.get_run(run_id).data.params
        Param, RunTag = self._entities[1], self._entities[2]
        new = [Param(k, _cut(v, MAX_PARAM_CHARS)) for k, v in params.items() if k not in held]
        changed = [RunTag(CHANGED_PARAM_TAG + k, _cut(v, MAX_TAG_CHARS)) for k, v in params.items()
                   if k in held and held[k] != _cut(v, MAX_PARAM_CHARS)]
        for chunk in _chunks(new, MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=chunk)
        for chunk in _chunks(changed, MAX_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=chunk)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None) -> None:
        Metric = self._entities[0]
        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step if step is not None else 0) for k, v in metrics.items()
                  if math.isfinite(v)]
        for chunk in _chunks(values, MAX_METRICS_PER_BATCH):
            self.client().log_batch(run_id, metrics=chunk)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        RunTag = self._entities[2]
        for chunk in _chunks([RunTag(k, _cut(v, MAX_TAG_CHARS)) for k, v in tags.items()], MAX_TAGS_PER_BATCH):
            self.client().log_batch(run_id, tags=chunk)

    def log_artifact(self, run_id: str, path: Path, folder: str = "") -> None:
        self.client().log_artifact(run_id, str(path), artifact_path=folder or None)

    def end(self, run_id: str, status: RunStatus) -> None:
        self.client().set_terminated(run_id, status=status.value)

    def is_transient(self, error: BaseException) -> bool:
        return not (isinstance(error, self._exception) and error.error_code in PERMANENT_ERRORS)

    def close(self) -> None:
        self._client_obj = None


def safe_folder(name: str) -> str:
    """An experiment name as one folder name under the artifact root."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._") or "experiment"


@contextlib.contextmanager
def _store_lock(spec: TrackSpec) -> Iterator[None]:
    """An exclusive lock beside a local sqlite store while its client is made (its tables created)."""
    if not spec.target.startswith("sqlite:///"):
        yield
        return
    db = Path(spec.target[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a", encoding="utf-8") as f, fork_private(f.fileno()):
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # a data worker forked meanwhile closes its copy at once
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
