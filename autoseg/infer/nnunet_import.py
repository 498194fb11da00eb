"""`autoseg import-nnunet`: an nnU-Net v2 trainer folder becomes an autoseg model folder.

Reads ``<Trainer>__<Plans>__<config>/`` (plans.json, dataset.json, fold_<k>/checkpoint_<final|best>.pth,
postprocessing.json where present) and writes ``results/<dataset>/`` the way an installed model
looks (`autoseg.infer.exchange`), so ``predict -m``, ``export-model``, ``export-nnunet`` and
``--pretrained`` take it like a model autoseg trained:

    <dataset>/manifest.json, dataset.json, plans[_<preset>].json, best.json (with postprocessing.json)
    <dataset>/[<preset>__]<config>/nnunet_import.json            where it came from
    <dataset>/[<preset>__]<config>/nnunet/                       nnU-Net's plans/dataset/fingerprint json, as found
    <dataset>/[<preset>__]<config>/default/fold_<k>/checkpoint_<final|best>.pt, trainer_config.json, plans.json,
                                                    dataset.json, validation/CASE<ending> (nnU-Net's CV masks)

Checkpoints are read with ``torch.load(weights_only=True)`` and, only for that call, numpy's
scalar and array types allowed (nnU-Net stores its log as numpy floats); anything else in the
pickle is refused in one line and nothing is executed. The weights are renamed
(`autoseg.infer.nnunet_keys`) and loaded strictly into the network the plans describe
(`autoseg.infer.nnunet_plans`), so a trainer with its own network fails here, not at predict.
The mirroring axes come from the checkpoint (``inference_allowed_mirroring_axes``; none means
no test-time mirroring), as nnUNetPredictor takes them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

import autoseg
from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_json, load_record, read_json, record_to_dict, save_record
from autoseg.common.paths import Paths, TrainingId
from autoseg.data.augment import AugmentConfig
from autoseg.infer.exchange import MANIFEST_FILE, ManifestFile, ModelManifest, sha256_of
from autoseg.infer.nnunet_keys import to_autoseg_state
from autoseg.infer.nnunet_plans import plan_from_nnunet
from autoseg.infer.nnunet_postprocessing import best_record, find_postprocessing
from autoseg.nets.unet import build_unet
from autoseg.planning.plans import Plan
from autoseg.train.checkpoint import Checkpoint, RngState, load_model_state, save_checkpoint
from autoseg.train.config import TrainerConfig

log = logging.getLogger(__name__)

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
"""``--checkpoint`` -> nnU-Net's checkpoint file in each fold folder."""
IMPORT_RECORD = "nnunet_import.json"
SOURCE_DIR = "nnunet"
SOURCE_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
VARIANT = "default"
TRAINER_DIR_RE = re.compile(r"^(?P<trainer>[^_].*?)__(?P<plans>.+?)__(?P<config>[^_].*)$")
"""nnU-Net's ``<Trainer>__<Plans>__<configuration>`` results folder name."""
_FOLD_RE = re.compile(r"^fold_(\d+|all)$")


def _numpy_globals() -> list[Any]:
    """What nnU-Net's checkpoints pickle besides tensors: numpy scalars, arrays and dtypes.

    Files written under numpy 1 name the reconstructors ``numpy.core.multiarray.*``, under numpy 2
    ``numpy._core.multiarray.*``: both names are allowed for the same two functions.
    """
    multiarray = getattr(np, "_core", np).multiarray
    allowed: list[Any] = [np.ndarray, np.dtype]
    for fn in (multiarray.scalar, multiarray._reconstruct):
        allowed += [(fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    allowed += list({type(np.dtype(c)) for c in "?bBhHiIlLqQefdg"})
    return allowed


def load_nnunet_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint dict, loaded without running code; one line when it cannot be."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_globals()):
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign global, a truncated file, not a torch file
        text = str(e)
        found = re.search(r"GLOBAL (\S+)", text) or re.search(r"Unsupported global: (\S+)", text)
        if found:
            raise AutosegError(f"refused: the checkpoint would import {found.group(1).rstrip('.,:;')} (unpickling "
                               "it could run code); an nnU-Net checkpoint holds only tensors, numbers and "
                               "containers", path) from None
        first = text.strip().splitlines()[0][:120] if text.strip() else type(e).__name__
        raise AutosegError(f"cannot read the checkpoint ({first})", path) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("network_weights"), dict):
        raise AutosegError("not an nnU-Net checkpoint (no 'network_weights')", path)
    if not isinstance(raw.get("init_args"), dict) or "configuration" not in raw["init_args"]:
        raise AutosegError("not an nnU-Net checkpoint (no 'init_args.configuration')", path)
    return raw


@dataclass(frozen=True)
class NnunetImportRecord:
    """Where an imported configuration came from (``<config>/nnunet_import.json``)."""

    SCHEMA: ClassVar[str] = "autoseg.nnunet_import"
    VERSION: ClassVar[int] = 1

    source: str
    trainer: str
    plans_name: str
    configuration: str
    folds: tuple[int | str, ...]
    checkpoint: str
    epochs: tuple[int, ...]
    """nnU-Net's ``current_epoch`` of each fold's checkpoint."""
    mirror_axes: tuple[int, ...]
    source_sha256: tuple[str, ...]
    postprocessing: str | None
    notes: tuple[str, ...] = ()
    autoseg_version: str = ""


@dataclass(frozen=True)
class ImportResult:
    """What `import_nnunet` wrote."""

    dataset: str
    config_dirname: str
    folds: tuple[int | str, ...]
    checkpoint: str
    model_folder: Path
    has_postprocessing: bool
    notes: tuple[str, ...]


def _available_folds(folder: Path, checkpoint: str) -> list[int | str]:
    folds = []
    for d in folder.iterdir():
        m = _FOLD_RE.match(d.name)
        if m and m.group(1) != "all" and (d / CHECKPOINTS[checkpoint]).is_file():
            folds.append(int(m.group(1)))
    return sorted(folds)


def _fold_value(fold: int | str) -> int | str:
    return int(fold) if str(fold).isdigit() else str(fold)


def _mirror_config(axes: Any, ndim: int, where: Path) -> tuple[AugmentConfig, tuple[int, ...]]:
    """The augmentation record whose `training_mirror_axes` are the checkpoint's inference axes."""
    if axes is None:
        return AugmentConfig(mirror=False), ()
    try:
        axes = tuple(sorted(int(a) for a in axes))
    except (TypeError, ValueError):
        raise AutosegError(f"inference_allowed_mirroring_axes {axes!r} is not a list of axes", where) from None
    if any(not 0 <= a < ndim for a in axes):
        raise AutosegError(f"inference_allowed_mirroring_axes {list(axes)} outside the {ndim} spatial axes", where)
    if not axes:
        return AugmentConfig(mirror=False), ()
    return AugmentConfig(mirror_axes=None if axes == tuple(range(ndim)) else axes), axes


@dataclass(frozen=True)
class _Source:
    """One trainer folder, read and checked (nothing written yet)."""

    folder: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    plan: Plan
    config_name: str
    folds: tuple[int | str, ...]
    checkpoints: tuple[Checkpoint, ...]
    raw: tuple[dict[str, Any], ...]
    mirror_axes: tuple[int, ...]


def _read_source(folder: Path, folds: Sequence[int | str] | None, checkpoint: str) -> _Source:
    """Read plans, dataset.json and every fold's checkpoint; convert and strictly load each network."""
    if checkpoint not in CHECKPOINTS:
        raise AutosegError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, not {checkpoint!r}", "--checkpoint")
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise AutosegError("nnU-Net results folder not found", folder)
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise AutosegError(f"no {name}: give an nnU-Net trainer folder (<Trainer>__<Plans>__<config>)", folder)
    plans, dataset_json = read_json(folder / "plans.json"), read_json(folder / "dataset.json")
    folds = [_fold_value(f) for f in folds] if folds else _available_folds(folder, checkpoint)
    if not folds:
        raise AutosegError(f"no fold_<k>/{CHECKPOINTS[checkpoint]} here (try --checkpoint best?)", folder)
    raws, config_name = [], None
    for fold in folds:
        path = folder / f"fold_{fold}" / CHECKPOINTS[checkpoint]
        if not path.is_file():
            raise AutosegError(f"fold {fold} has no {CHECKPOINTS[checkpoint]}", path)
        raw = load_nnunet_checkpoint(path)
        name = str(raw["init_args"]["configuration"])
        if config_name not in (None, name):
            raise AutosegError(f"fold {fold} is configuration {name!r}, fold {folds[0]} {config_name!r}", path)
        config_name = name
        raws.append(raw)
    m = TRAINER_DIR_RE.match(folder.name)
    if m and m.group("config") != config_name:
        log.warning("%s: the folder name says %s, the checkpoints %s; using the checkpoints'", folder,
                    m.group("config"), config_name)
    plan = plan_from_nnunet(plans, dataset_json, config_name, folder / "plans.json")
    config = plan.configuration(config_name)
    # nnUNetPredictor mirrors along the first fold's axes
    augment, mirror = _mirror_config(raws[0].get("inference_allowed_mirroring_axes"), config.ndim,
                                     folder / f"fold_{folds[0]}" / CHECKPOINTS[checkpoint])
    in_channels = plan.num_channels + (plan.num_classes - 1 if config.previous_stage else 0)
    ckpts = []
    for fold, raw in zip(folds, raws):
        where = folder / f"fold_{fold}" / CHECKPOINTS[checkpoint]
        net = build_unet(config, in_channels, plan.num_classes)
        state = to_autoseg_state(raw["network_weights"], config.encoder == "residual", where)
        load_model_state(net, state, where)  # a trainer with its own network stops here, in one line
        ckpts.append(Checkpoint(
            model_state={k: v.detach().clone() for k, v in net.state_dict().items()}, optimizer_state={},
            scaler_state={}, epoch=int(raw.get("current_epoch") or 0), best_ema_pseudo_dice=_float(raw.get("_best_ema")),
            history=[], rng=RngState(torch_cpu=torch.zeros(0, dtype=torch.uint8)),
            trainer_config=TrainerConfig(augment=augment), plan=plan, config_name=config_name,
            dataset=plan.dataset, fold=fold, num_input_channels=in_channels, num_classes=plan.num_classes))
    return _Source(folder, plans, dataset_json, plan, config_name, tuple(folds), tuple(ckpts), tuple(raws), mirror)


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _existing_manifest(target: Path, folds: tuple[int | str, ...], checkpoint: str) -> ModelManifest | None:
    """The model folder's manifest, or None when there is no folder yet; refuses training results."""
    if not target.exists() or not any(target.iterdir()):  # none yet, or what a failed first import left
        return None
    if not (target / MANIFEST_FILE).is_file():
        raise AutosegError("holds training results, not a model folder; import into another --results root", target)
    manifest = load_record(target / MANIFEST_FILE, ModelManifest)
    if tuple(manifest.folds) != folds or manifest.checkpoint != checkpoint:
        raise AutosegError(f"the model folder holds folds {list(manifest.folds)} ({manifest.checkpoint}); import "
                           f"the same folds and checkpoint, or into another --results root", target / MANIFEST_FILE)
    return manifest


def _write_config(src: _Source, stage: Path, checkpoint: str, notes: list[str]) -> None:
    """The configuration folder's contents under ``stage`` (renamed into place afterwards)."""
    ending = str(src.dataset_json.get("file_ending", ".nii.gz"))
    for ckpt in src.checkpoints:
        fold_dir = stage / VARIANT / f"fold_{ckpt.fold}"
        fold_dir.mkdir(parents=True)
        save_checkpoint(fold_dir / f"checkpoint_{checkpoint}.pt", ckpt)
        save_record(fold_dir / "trainer_config.json", ckpt.trainer_config)
        save_record(fold_dir / "plans.json", src.plan)
        atomic_write_json(fold_dir / "dataset.json", src.dataset_json)
        validation = src.folder / f"fold_{ckpt.fold}" / "validation"
        masks = sorted(validation.glob(f"*{ending}")) if validation.is_dir() else []
        if masks:  # nnU-Net's cross-validation masks: `autoseg evaluate` + `find-best` can use them
            (fold_dir / "validation").mkdir()
            for f in masks:
                shutil.copyfile(f, fold_dir / "validation" / f.name)
    (stage / SOURCE_DIR).mkdir()
    for name in SOURCE_FILES:
        if (src.folder / name).is_file():
            shutil.copyfile(src.folder / name, stage / SOURCE_DIR / name)
    if not (src.folder / "dataset_fingerprint.json").is_file():
        notes.append("no dataset_fingerprint.json (not needed to predict)")


def import_nnunet(paths: Paths, folder: Path, folds: Sequence[int | str] | None = None, checkpoint: str = "final",
                  force: bool = False) -> ImportResult:
    """Convert one nnU-Net trainer folder into ``results/<dataset>/`` (see the module doc).

    A second configuration of the same dataset joins the model folder (same folds and
    checkpoint); an already imported configuration is replaced only with ``force``.
    """
    src = _read_source(Path(folder), folds, checkpoint)
    plan, dataset = src.plan, src.plan.dataset
    tid = TrainingId(dataset, src.config_name, 0, VARIANT, plans=plan.preset)
    target = paths.results_dataset(dataset)
    manifest = _existing_manifest(target, src.folds, checkpoint)
    config_dir = target / tid.config_dirname
    if config_dir.exists() and not force:
        raise AutosegError("this configuration was imported before; use --force to replace it", config_dir)
    pp_file, notes = find_postprocessing(src.folder, src.folds)
    fresh = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".import-{tid.config_dirname}-", dir=target))
    try:
        _write_config(src, tmp, checkpoint, notes)
        record = NnunetImportRecord(
            source=str(src.folder), trainer=str(src.raw[0].get("trainer_name", "")),
            plans_name=str(src.plans.get("plans_name", "")), configuration=src.config_name, folds=src.folds,
            checkpoint=checkpoint, epochs=tuple(c.epoch for c in src.checkpoints), mirror_axes=src.mirror_axes,
            source_sha256=tuple(sha256_of(src.folder / f"fold_{f}" / CHECKPOINTS[checkpoint]) for f in src.folds),
            postprocessing=str(pp_file) if pp_file else None, notes=tuple(notes), autoseg_version=autoseg.__version__)
        save_record(tmp / IMPORT_RECORD, record)
        if config_dir.exists():
            shutil.rmtree(config_dir)
        os.replace(tmp, config_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        raise
    atomic_write_json(target / "dataset.json", src.dataset_json)
    save_record(target / paths.plans_file(dataset, plan.preset).name, plan)
    has_best = _write_best(target, dataset, tid.config_dirname, src, checkpoint, pp_file, notes)
    configs = tuple(dict.fromkeys([*(manifest.configs if manifest else ()), tid.config_dirname]))
    files = tuple(ManifestFile(p.relative_to(target).as_posix(), p.stat().st_size, sha256_of(p))
                  for p in sorted(target.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE
                  and not p.relative_to(target).parts[0].startswith("."))
    new = ModelManifest(autoseg.__version__, dataset, configs, src.folds, VARIANT, checkpoint, files,
                        has_best or bool(manifest and manifest.has_best))
    atomic_write_json(target / MANIFEST_FILE, record_to_dict(new))
    _note_previous_stage(plan, src.config_name, target, tid, notes)
    for note in notes:
        log.info("%s", note)
    return ImportResult(dataset, tid.config_dirname, src.folds, checkpoint, target, has_best, tuple(notes))


def _write_best(target: Path, dataset: str, config_dirname: str, src: _Source, checkpoint: str,
                pp_file: Path | None, notes: list[str]) -> bool:
    """best.json from postprocessing.json; never over one that names other configurations."""
    if pp_file is None:
        return False
    if any(isinstance(f, str) for f in src.folds):
        notes.append(f"{pp_file} left out: best.json takes numbered folds only")
        return False
    best = target / "best.json"
    if best.is_file() and read_json(best).get("configs") != [config_dirname]:
        notes.append(f"{pp_file} left out: {best} already names {read_json(best).get('configs')}")
        return False
    record = best_record(dataset, config_dirname, [int(f) for f in src.folds], checkpoint, pp_file,
                         src.plan.label_scheme)
    atomic_write_json(best, record)
    return True


def _note_previous_stage(plan: Plan, config_name: str, target: Path, tid: TrainingId, notes: list[str]) -> None:
    prev = plan.configuration(config_name).previous_stage
    if prev is None:
        return
    prev_dir = dataclasses.replace(tid, config=prev).config_dirname
    if not (target / prev_dir).is_dir():
        notes.append(f"{config_name} is a cascade stage: import its previous stage ({prev}) too before predicting")


def imported_from(model_folder: Path, config_dirname: str) -> NnunetImportRecord | None:
    """The import record of a configuration of a model folder, or None when it was not imported."""
    path = Path(model_folder) / config_dirname / IMPORT_RECORD
    return load_record(path, NnunetImportRecord) if path.is_file() else None

