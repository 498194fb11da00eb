"""Weights & Biases: one W&B run per autoseg run, offline (``WANDB_MODE=offline``) with no account.

The project is the spec's target (default ``autoseg``), the experiment becomes the W&B group
(a dataset, or a sweep), runs are made with ``reinit="create_new"`` so one process may hold
several, and the local run directory is the run's folder (``fold_k/wandb/``), synced later with
``wandb sync``. W&B has no nested runs: the parent's id is a config entry and the shared group
keeps a sweep's runs together. Params are the run's config; end-of-run values its summary;
tags are ``tag.<key>`` config entries (W&B's own tags are short labels); artifacts are copied
into the run's files (``symlink=False``: a fold dir may be moved or cleaned afterwards).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autoseg.track.base import RunRequest, RunStatus
from autoseg.track.spec import WANDB_DEFAULT_PROJECT, TrackSpec

EXIT_CODES = {RunStatus.FINISHED: 0, RunStatus.FAILED: 1, RunStatus.KILLED: 130}
"""W&B marks a run by its exit code: 0 finished, anything else failed (130: interrupted, as the CLI exits)."""

LABEL_TAGS = ("autoseg.dataset", "autoseg.config", "autoseg.sweep")
"""Tags also shown as W&B labels (short values only: W&B caps a label at 64 characters)."""

MAX_LABEL_CHARS = 64


class WandbBackend:
    """`autoseg.track.base.Backend` over ``wandb.init`` / ``Run`` objects (no global ``wandb.run``)."""

    name = "wandb"

    def __init__(self, spec: TrackSpec) -> None:
        import wandb  # the optional extra: imported here, in the caller's thread

        self.spec = spec
        self._wandb = wandb
        self._runs: dict[str, Any] = {}

    def start(self, request: RunRequest) -> str:
        wandb = self._wandb
        request.folder.mkdir(parents=True, exist_ok=True)
        labels = [f"{k.split('.')[-1]}={v}" for k, v in request.tags.items()
                  if k in LABEL_TAGS and len(k) + len(v) < MAX_LABEL_CHARS]
        config: dict[str, str] = {f"tag.{k}": v for k, v in request.tags.items()}
        if request.parent_id:
            config["autoseg.parent_run_id"] = request.parent_id
        run = wandb.init(project=self.spec.target or WANDB_DEFAULT_PROJECT, group=request.experiment,
                         name=request.name, dir=str(request.folder), id=request.resume_id or None,
                         resume="allow" if request.resume_id else None, tags=labels, config=config,
                         reinit="create_new",
                         settings=wandb.Settings(console="off", silent=True, symlink=False, x_disable_stats=True,
                                                 disable_git=True, save_code=False))
        self._runs[run.id] = run
        return run.id

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        self._runs[run_id].config.update(dict(params), allow_val_change=True)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None) -> None:
        run = self._runs[run_id]
        if step is None:
            run.summary.update(dict(metrics))
        else:
            run.log(dict(metrics), step=step)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self._runs[run_id].config.update({f"tag.{k}": v for k, v in tags.items()}, allow_val_change=True)

    def log_artifact(self, run_id: str, path: Path, folder: str = "") -> None:
        self._runs[run_id].save(str(path), base_path=str(path.parent), policy="now")

    def end(self, run_id: str, status: RunStatus) -> None:
        run = self._runs.pop(run_id)
        run.summary["autoseg.status"] = status.value
        run.finish(exit_code=EXIT_CODES[status])

    def is_transient(self, error: BaseException) -> bool:
        errors = self._wandb.errors
        return not isinstance(error, (errors.UsageError, errors.AuthenticationError, KeyError))

    def close(self) -> None:
        for run in self._runs.values():
            run.finish(exit_code=EXIT_CODES[RunStatus.KILLED])
        self._runs.clear()
