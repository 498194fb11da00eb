"""Read runs back from MLflow: a sweep's table rebuilt from the tracker (``sweep-report --from-tracker``).

Only MLflow can be asked: TensorBoard's event files and W&B's offline runs hold the same
numbers, but have no query API that works without their servers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoseg.common.errors import AutosegError
from autoseg.track.base import require_backend
from autoseg.track.mlflow_backend import PARENT_TAG
from autoseg.track.spec import TrackSpec

MAX_RUNS = 50_000
"""Runs read from one experiment at most (a sweep of 5 datasets x 40 variants x 5 folds x 5 seeds is 5,000)."""


@dataclass(frozen=True)
class TrackedRun:
    """One run as the tracker holds it: latest value of each metric, params, tags."""

    run_id: str
    name: str
    status: str
    start_time: int
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]

    @property
    def parent_id(self) -> str | None:
        return self.tags.get(PARENT_TAG)


class MlflowReader:
    """Queries over one MLflow tracking URI."""

    def __init__(self, spec: TrackSpec) -> None:
        if spec.backend != "mlflow":
            raise AutosegError(f"reading runs back needs MLflow; this sweep was tracked with {spec.backend}",
                               "--from-tracker")
        require_backend(spec, "--from-tracker")
        from mlflow import MlflowClient  # the optional extra

        self.client = MlflowClient(tracking_uri=spec.target)

    def runs(self, experiment: str, filter_string: str = "") -> list[TrackedRun]:
        """Every run of ``experiment`` matching an MLflow filter (``tags.`autoseg.kind` = 'fold'``), oldest first."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            raise AutosegError(f"no MLflow experiment {experiment!r}", "--from-tracker")
        runs: list[Any] = []
        token = None
        while len(runs) < MAX_RUNS:
            page = self.client.search_runs([found.experiment_id], filter_string=filter_string, max_results=1000,
                                           page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
        out = [TrackedRun(r.info.run_id, r.info.run_name or "", r.info.status, int(r.info.start_time or 0),
                          dict(r.data.params), dict(r.data.tags), dict(r.data.metrics)) for r in runs]
        return sorted(out, key=lambda r: r.start_time)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of one metric, the last value per step (a resumed run may log a step twice)."""
        by_step: dict[int, tuple[int, float]] = {}
        for m in self.client.get_metric_history(run_id, key):
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, m.value)
        return [(step, by_step[step][1]) for step in sorted(by_step)]

    def artifacts(self, run_id: str, folder: str = "") -> list[str]:
        """Every artifact file of a run, as paths relative to its artifact root."""
        out: list[str] = []
        for info in self.client.list_artifacts(run_id, folder or None):
            out.extend(self.artifacts(run_id, info.path) if info.is_dir else [info.path])
        return sorted(out)
