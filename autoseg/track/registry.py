"""Pick the backend of a spec and start a `RunLogger` on it; tracking that cannot start only warns."""

from __future__ import annotations

import logging
from collections.abc import Callable

from autoseg.track.base import Backend, RunRequest, require_backend
from autoseg.track.logger import RunLogger
from autoseg.track.mlflow_backend import MlflowBackend
from autoseg.track.spec import TrackSpec
from autoseg.track.tensorboard_backend import TensorBoardBackend
from autoseg.track.wandb_backend import WandbBackend

log = logging.getLogger(__name__)

BACKEND_CLASSES: dict[str, Callable[[TrackSpec], Backend]] = {
    "mlflow": MlflowBackend, "tensorboard": TensorBoardBackend, "wandb": WandbBackend}
"""Each backend module imports its tracker only when the class is instantiated."""


def open_backend(spec: TrackSpec) -> Backend:
    """The backend object for ``spec``; its tracker package is imported now, in the caller's thread."""
    require_backend(spec)
    return BACKEND_CLASSES[spec.backend](spec)


def open_run(spec: TrackSpec, request: RunRequest,
             on_started: Callable[[str], None] | None = None) -> RunLogger | None:
    """A `RunLogger` for one run, or None (one warning) when the tracker cannot even be loaded."""
    try:
        backend = open_backend(spec)
    except Exception as e:  # a broken install must not stop a training that only wanted to be tracked
        log.warning("tracking (%s) is off for %s: %s", spec.backend, request.name, e)
        return None
    return RunLogger(backend, request, on_started)
