"""Preprocess a whole dataset: every training case of each configuration into its data folder.

Splits are made first (a bad splits file fails before an hour of preprocessing), cases run in
spawned worker processes, complete cases are skipped, and a folder made with other settings
is refused unless forced. A run holds an exclusive lock on the data folder (``.lock``), so two
runs never write the same cases, and every temp file of a case write found under the lock was
left by a killed run.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import zlib
from collections.abc import Iterator
from concurrent.futures import as_completed
from pathlib import Path

import numpy as np

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import load_record, save_record
from autoseg.common.paths import Paths
from autoseg.common.procs import spawn_pool
from autoseg.common.progress import progress
from autoseg.dataset.io import read_case, read_image
from autoseg.dataset.spec import CaseFiles, load_dataset
from autoseg.planning.plans import Configuration, Plan
from autoseg.preprocess.case import FG_SEED, OUTSIDE_MASK_LABEL, outside_mask_label, preprocess_case
from autoseg.preprocess.store import (SETTINGS_FILENAME, PreprocessingSettings, list_preprocessed_cases,
                                      save_preprocessed_case)
from autoseg.splits import ensure_splits

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
"""Held (``flock``) in a data folder while a run preprocesses into it."""

STALE_TEMP_RE = re.compile(r"^\..+\.(npy|npz|json)\.[A-Za-z0-9_]+\.tmp$")
"""Temp files of the folder's atomic writes (``atomic_write_with``: ``.<name>.<random>.tmp``)."""


def settings_for(plan: Plan, config: Configuration) -> PreprocessingSettings:
    """The preprocessing-relevant part of a plan for one configuration."""
    return PreprocessingSettings(
        dataset=plan.dataset, data_identifier=config.data_identifier, ndim=config.ndim,
        spacing=tuple(float(s) for s in config.spacing), transpose_forward=tuple(plan.transpose_forward),
        normalization=tuple(plan.normalization), labels=dict(plan.labels),
        resample_order_data=config.resample_order_data, resample_order_seg=config.resample_order_seg,
        outside_mask_label=outside_mask_label(plan.normalization))


def _case_seed(case_id: str) -> np.random.Generator:
    """Foreground sampling seed from the case id: same files whichever worker runs the case."""
    return np.random.default_rng([FG_SEED, zlib.crc32(case_id.encode())])


def _preprocess_to_folder(case: CaseFiles, plan: Plan, config: Configuration, folder: Path) -> str:
    """Read, preprocess and write one raw training case (runs in a worker process)."""
    if case.label is None:
        raise AutosegError("training case has no label file", case.images[0])
    data, geometry = read_case(case.images)
    seg, seg_geometry = read_image(case.label)
    diffs = geometry.differences(seg_geometry)
    if diffs:
        raise AutosegError(f"label geometry differs from the image: {'; '.join(diffs)}", case.label)
    out, out_seg, props, fg = preprocess_case(data, geometry, seg, plan, config, _case_seed(case.case_id),
                                              case_id=case.case_id)
    save_preprocessed_case(folder, out, out_seg, props, fg)  # type: ignore[arg-type]
    return case.case_id


def load_dataset_plan(paths: Paths, dataset: str, plan_file: Path | None = None) -> Plan:
    """The dataset's plans.json (or ``plan_file``), with a clear message when planning never ran."""
    path = Path(plan_file) if plan_file is not None else paths.plans_file(dataset)
    if not path.exists():
        hint = "" if plan_file is not None else f"; run `autoseg plan {dataset}` first"
        raise AutosegError(f"plan file not found{hint}", path)
    return load_record(path, Plan)


def _check_settings(folder: Path, settings: PreprocessingSettings, force: bool) -> None:
    path = folder / SETTINGS_FILENAME
    if path.exists() and not force:
        old = load_record(path, PreprocessingSettings)
        if old.outside_mask_label != settings.outside_mask_label:
            raise AutosegError(
                f"this folder's labels {'do not mark' if old.outside_mask_label is None else 'mark'} the outside "
                f"of the nonzero mask with {OUTSIDE_MASK_LABEL}, the plan's normalization needs them "
                f"{'marked' if settings.outside_mask_label is not None else 'unmarked'} (made by an older "
                "autoseg or another plan); rerun with --force to redo it", path)
        if old != settings:
            raise AutosegError("this folder was preprocessed with different settings (spacing, normalization, "
                               "labels or transpose); rerun with --force to redo it, or give the plan's "
                               "configuration another data_identifier", path)
        return
    save_record(path, settings)


def preprocess_dataset(paths: Paths, dataset: str, config_names: list[str], num_workers: int = 1,
                       force: bool = False, plan: Plan | None = None) -> dict[str, Path]:
    """Make sure splits exist, then preprocess every training case for each configuration.

    Configurations sharing a ``data_identifier`` are done once. Complete cases are skipped
    (a case without its json is redone) unless ``force``. Returns config name -> data folder.
    """
    plan = plan if plan is not None else load_dataset_plan(paths, dataset)
    if plan.dataset != dataset:
        raise AutosegError(f"the plan is for {plan.dataset}, not {dataset}", "plans.json:dataset")
    if num_workers < 1:
        raise AutosegError(f"number of workers must be at least 1, got {num_workers}", "-j")
    unknown = [n for n in config_names if n not in plan.configurations]
    if unknown:
        raise AutosegError(f"configuration(s) {', '.join(unknown)} not in the plan of {dataset} "
                           f"(planned: {', '.join(plan.configurations)})", "configs")
    configs = [plan.configurations[n] for n in (config_names or list(plan.configurations))]
    spec = load_dataset(paths.raw_dataset(dataset))
    if plan.num_channels != spec.num_channels:
        raise AutosegError(f"the plan has {plan.num_channels} channel(s), the dataset {spec.num_channels}",
                           spec.dataset_json)
    # splits first: a bad user splits file fails now, not after an hour of preprocessing
    ensure_splits(paths, dataset, [c.case_id for c in spec.cases])
    by_identifier: dict[str, Configuration] = {}
    for config in configs:
        first = by_identifier.setdefault(config.data_identifier, config)
        if settings_for(plan, first) != settings_for(plan, config):
            raise AutosegError(f"configurations {first.name!r} and {config.name!r} share data_identifier "
                               f"{config.data_identifier!r} but preprocess differently", "plans.json")
    pool = spawn_pool(num_workers) if num_workers > 1 else None  # workers die with us, even SIGKILLed
    try:
        for identifier, config in by_identifier.items():
            folder = paths.preprocessed_data(dataset, identifier)
            folder.mkdir(parents=True, exist_ok=True)
            with _folder_lock(folder):
                _remove_stale_temp_files(folder)
                _check_settings(folder, settings_for(plan, config), force)
                done = set() if force else set(list_preprocessed_cases(folder))
                todo = [c for c in spec.cases if c.case_id not in done]
                log.info("%s/%s: %d case(s) to preprocess, %d already done", dataset, identifier,
                         len(todo), len(spec.cases) - len(todo))
                desc = f"preprocess {identifier}"
                if pool is None:
                    for case in progress(todo, total=len(todo), desc=desc, unit="case"):
                        _preprocess_to_folder(case, plan, config, folder)
                else:
                    futures = [pool.submit(_preprocess_to_folder, c, plan, config, folder) for c in todo]
                    for fut in progress(as_completed(futures), total=len(futures), desc=desc, unit="case"):
                        fut.result()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return {c.name: paths.preprocessed_data(dataset, c.data_identifier) for c in configs}


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<folder>/.lock`` (our pid inside) while preprocessing into it.

    The kernel drops the lock when its holder dies, even by SIGKILL, so a killed run leaves no
    stale lock; a live holder makes us refuse with its pid. The pool's workers are spawned
    (exec), so they do not inherit the descriptor (Python opens it non-inheritable).
    """
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AutosegError(f"another process (pid {holder}) is preprocessing into this folder; "
                           "wait for it to finish or stop it first", folder) from None
    try:
        with contextlib.suppress(OSError):  # the pid is for the message only: a full disk must not stop us here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of writes a killed run left (up to a whole case array each); call under the lock."""
    for f in folder.iterdir():
        if STALE_TEMP_RE.match(f.name) and f.is_file():
            f.unlink(missing_ok=True)
            log.info("removed %s, left by a killed preprocessing run", f)
