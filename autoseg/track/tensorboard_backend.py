"""TensorBoard (``torch.utils.tensorboard``): event files beside each fold, or under one folder.

A run is a log directory, and its id is that directory's path: ``fold_k/tensorboard/`` by
default, ``<target>/<run name>/`` with ``tensorboard:DIR``. Metrics are scalars at the epoch,
params go to the HParams dashboard (once per directory: a resumed run keeps its first session)
and, readable as text, to ``params``; tags and the end status are text summaries. TensorBoard
has no artifact store, so files are copied into ``<log dir>/artifacts/`` and progress.png is
also shown as an image. A "parent" is only recorded as a text tag: TensorBoard has no nesting,
but a sweep's folder of runs (``tensorboard:DIR``) shows them side by side.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autoseg.track.base import RunRequest, RunStatus
from autoseg.track.spec import TrackSpec

LOG_DIR = "tensorboard"
"""The log directory inside a run's folder (the fold dir) when no target folder is given."""

ARTIFACTS_DIR = "artifacts"
EVENT_GLOB = "events.out.tfevents.*"


class TensorBoardBackend:
    """`autoseg.track.base.Backend` over `torch.utils.tensorboard.SummaryWriter`."""

    name = "tensorboard"

    def __init__(self, spec: TrackSpec) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        from torch.utils.tensorboard.summary import hparams

        self.spec = spec
        self._writer_class, self._hparams = SummaryWriter, hparams
        self._writers: dict[str, Any] = {}
        self._resumed: set[str] = set()

    def log_dir(self, request: RunRequest) -> Path:
        if self.spec.target:  # the run's name as sub-folders: TensorBoard lists runs by their relative path
            parts = [re.sub(r"[^A-Za-z0-9._=-]+", "_", p).strip("._") or "_" for p in request.name.split("/")]
            return Path(self.spec.target, *parts)
        return request.folder / LOG_DIR

    def start(self, request: RunRequest) -> str:
        folder = Path(request.resume_id) if request.resume_id else self.log_dir(request)
        resumed = folder.is_dir() and any(folder.glob(EVENT_GLOB))
        writer = self._writer_class(log_dir=str(folder))
        run_id = str(folder)
        self._writers[run_id] = writer
        if resumed:
            self._resumed.add(run_id)
        tags = {**request.tags, "experiment": request.experiment, "name": request.name}
        if request.parent_id:
            tags["parent"] = request.parent_id
        self.set_tags(run_id, tags)
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        writer = self._writers[run_id]
        if run_id not in self._resumed:  # HParams reads the first session of a directory only
            experiment, start, _ = self._hparams({k: _number_or_text(v) for k, v in params.items()}, {})
            writer.file_writer.add_summary(experiment)
            writer.file_writer.add_summary(start)
        writer.add_text("params", "\n".join(f"    {k} = {v}" for k, v in sorted(params.items())))
        writer.flush()

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None) -> None:
        writer = self._writers[run_id]
        for key, value in metrics.items():
            writer.add_scalar(key, value, step if step is not None else 0)
        writer.flush()

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        writer = self._writers[run_id]
        for key, value in tags.items():
            writer.add_text(f"tag/{key}", value)
        writer.flush()

    def log_artifact(self, run_id: str, path: Path, folder: str = "") -> None:
        target = Path(run_id) / ARTIFACTS_DIR / folder
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.name)
        if path.suffix.lower() == ".png":
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                self._writers[run_id].add_image(f"{ARTIFACTS_DIR}/{path.stem}",
                                                np.asarray(image.convert("RGB")), dataformats="HWC")
        self._writers[run_id].add_text("artifacts", json.dumps(sorted(
            str(p.relative_to(Path(run_id) / ARTIFACTS_DIR)) for p in (Path(run_id) / ARTIFACTS_DIR).rglob("*")
            if p.is_file())))
        self._writers[run_id].flush()

    def end(self, run_id: str, status: RunStatus) -> None:
        writer = self._writers.pop(run_id)
        writer.add_text("status", status.value)
        writer.close()

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, OSError)  # a full or vanished disk may come back; anything else will not

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _number_or_text(value: str) -> float | str:
    """HParams sorts numbers as numbers: ``"0.01"`` becomes 0.01, everything else stays text."""
    try:
        return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "true", "false") else value
    except ValueError:
        return value
