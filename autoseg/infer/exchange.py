"""Share trained models: `export_model` writes a zip, `install_model` unpacks one into a results root.

A model zip holds one folder, ``<dataset>/``, laid out like ``results/<dataset>/`` after
training, so an installed model is used exactly like a trained one (``predict -d``,
``predict --best``), and an unzipped export is a model folder for ``predict -m``:

    <dataset>/manifest.json                    ModelManifest: what is inside, sizes and sha256
    <dataset>/dataset.json                     the raw dataset.json (channels, labels, file ending)
    <dataset>/plans.json, plans_<preset>.json  the plans of each preset the folds were trained with
    <dataset>/best.json                        find-best's choice + postprocessing (when it fits)
    <dataset>/[<preset>__]<config>/<variant>/fold_<k>/checkpoint_<final|best>.pt   weights only (see below)
    <dataset>/<config>/<variant>/fold_<k>/{trainer_config.json, plans.json, dataset.json}

Checkpoints are re-saved in our own checkpoint format without optimizer, scaler, RNG and
history: the same ``torch.load(weights_only=True)`` loader reads them, nothing is pickled,
and no new dependency (safetensors) is needed for the same safety. Installing verifies every
member against the manifest before writing anything, refuses members that could land outside
the target (absolute, ``..``, links, other top folders), refuses from the declared sizes alone
what exceeds the caps of `autoseg.infer.unpack_limits` (size, free space, compression ratio),
never reads a member past its declared size, and extracts into a temp folder that is renamed
into place, so a failed install leaves nothing behind. It replaces an installed model
(one with a manifest) only with ``force`` and never a folder of training results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

import torch

import autoseg
from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import (atomic_write_json, atomic_write_with, load_record, read_json, record_from_dict,
                                   record_to_dict)
from autoseg.common.paths import DATASET_NAME_RE, DEFAULT_PLANS, Paths, TrainingId
from autoseg.infer.predict import checkpoint_file
from autoseg.infer.unpack_limits import UnpackLimits, check_declared_sizes, read_declared
from autoseg.train.checkpoint import RngState, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
EXPORT_CHECKPOINTS = ("final", "best")
"""Which checkpoint an export takes; ``latest`` is a run in progress, not a model to share."""
FOLD_RECORDS = ("trainer_config.json", "plans.json", "dataset.json")
"""Files training copies next to a fold's checkpoints (autoseg.train.run); exported when present."""
BEST_FILE = "best.json"
"""Same name as `autoseg.evaluate.best.BEST_FILE` (not imported: that module pulls in cc3d and the metrics)."""
HASH_CHUNK = 1 << 20
MAX_MANIFEST_SIZE = 64 << 20
"""A manifest is read whole before any cap applies: 64 MiB is ~100x the largest real one."""
FOLDER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
"""A configuration or variant folder named by a manifest: no separators, no '..' (it becomes a path)."""


@dataclass(frozen=True)
class ManifestFile:
    """One file of an exported model, relative to the model folder."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelManifest:
    """What an exported model holds; ``install-model`` checks every file against it."""

    SCHEMA: ClassVar[str] = "autoseg.model_manifest"
    VERSION: ClassVar[int] = 1

    autoseg_version: str
    dataset: str
    configs: tuple[str, ...]
    """Results folder names (``3d_fullres``, ``resenc-l__3d_fullres``), as find-best names them."""
    folds: tuple[int | str, ...]
    variant: str
    checkpoint: str
    files: tuple[ManifestFile, ...]
    has_best: bool = False
    """best.json (find-best's configurations, folds and postprocessing) is included."""
    previous_stages: tuple[str, ...] = ()
    """Configurations exported only because a cascade in ``configs`` predicts with them."""


@dataclass(frozen=True)
class ModelFolder:
    """A model folder as `predict -m` sees it: its results root, dataset and manifest (if any)."""

    results_root: Path
    dataset: str
    manifest: ModelManifest | None

    @property
    def path(self) -> Path:
        return self.results_root / self.dataset

    @property
    def best_file(self) -> Path | None:
        best = self.path / BEST_FILE
        return best if best.is_file() else None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- export


def _weights_only_copy(src: Path, dest: Path) -> None:
    """Re-save a checkpoint with only what inference needs (weights, plan, trainer config, counts)."""
    ckpt = load_checkpoint(src)
    slim = dataclasses.replace(ckpt, optimizer_state={}, scaler_state={}, history=[],
                               rng=RngState(torch_cpu=torch.zeros(0, dtype=torch.uint8)))
    save_checkpoint(dest, slim)


def _config_dirnames(dataset: str, configs: Sequence[str], plans: str) -> list[str]:
    """Results folder names (``3d_fullres``, ``resenc-l__3d_fullres``) of the configurations, in order."""
    return list(dict.fromkeys(TrainingId(dataset, c, 0, plans=plans).config_dirname for c in configs))


def _previous_stages(paths: Paths, dataset: str, configs: Sequence[str], folds: Sequence[int | str],
                     variant: str, checkpoint: str) -> list[str]:
    """Folders of the cascades' previous stages not among ``configs`` (a cascade cannot predict without them)."""
    out, extra = list(configs), []
    i = 0
    while i < len(out):
        tid = TrainingId(dataset, out[i], folds[0], variant)
        ckpt = load_checkpoint(checkpoint_file(paths.training_dir(tid), checkpoint))
        prev = ckpt.plan.configuration(tid.config).previous_stage
        if prev is not None:
            prev_dir = TrainingId(dataset, prev, 0, plans=tid.plans).config_dirname
            if prev_dir not in out:
                log.info("%s is a cascade stage: exporting its previous stage %s too", out[i], prev_dir)
                _check_trained(paths, dataset, prev_dir, folds, variant, checkpoint)
                out.append(prev_dir)
                extra.append(prev_dir)
        i += 1
    return extra


def _check_trained(paths: Paths, dataset: str, config: str, folds: Sequence[int | str], variant: str,
                   checkpoint: str) -> None:
    """An error naming the folder when a configuration, fold or checkpoint is missing."""
    config_dir = paths.training_dir(TrainingId(dataset, config, 0, variant)).parent
    if not config_dir.is_dir():
        raise AutosegError(f"configuration {config!r} was not trained (variant {variant!r})", config_dir)
    for fold in folds:
        fold_dir = paths.training_dir(TrainingId(dataset, config, fold, variant))
        if not fold_dir.is_dir():
            raise AutosegError(f"fold {fold} of {config} was not trained", fold_dir)
        checkpoint_file(fold_dir, checkpoint)


def _best_fits(best_path: Path, configs: Sequence[str], folds: Sequence[int | str], variant: str,
               checkpoint: str) -> bool:
    """best.json goes along only when everything it names is in the export."""
    data = read_json(best_path)
    fits = (set(data.get("configs", ())) <= set(configs) and set(data.get("folds", ())) <= set(folds)
            and data.get("variant") == variant and data.get("checkpoint") == checkpoint)
    if not fits:
        log.warning("%s left out: it names configurations/folds/variant/checkpoint %s/%s/%s/%s outside this "
                    "export", best_path, data.get("configs"), data.get("folds"), data.get("variant"),
                    data.get("checkpoint"))
    return fits


def _copy_first(name: str, candidates: Sequence[Path], dest: Path) -> None:
    """Copy the first existing ``candidates`` file to ``dest``; a warning when there is none."""
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        log.warning("no %s found (looked at %s); the export goes without it", name,
                    ", ".join(map(str, candidates)))
    else:
        shutil.copyfile(found, dest)


def export_model(paths: Paths, dataset: str, configs: Sequence[str], folds: Sequence[int | str], output: Path,
                 variant: str = "default", checkpoint: str = "final", force: bool = False,
                 plans: str = DEFAULT_PLANS) -> ModelManifest:
    """Write ``output`` (a zip) with the given configurations' folds, records and a manifest.

    ``plans`` is the preset the folds were trained with; a configuration may also name its
    results folder (``resenc-l__3d_fullres``). Each preset's plans file goes along
    (``plans.json`` / ``plans_<preset>.json``).
    """
    output = Path(output)
    if checkpoint not in EXPORT_CHECKPOINTS:
        raise AutosegError(f"export takes checkpoint {' or '.join(EXPORT_CHECKPOINTS)}, not {checkpoint!r}",
                           "--checkpoint")
    if not configs or not folds:
        raise AutosegError("give at least one configuration (-c) and one fold (-f)")
    if output.exists() and not force:
        raise AutosegError("exists; use --force to overwrite it", output)
    configs = _config_dirnames(dataset, configs, plans)
    for config in configs:
        _check_trained(paths, dataset, config, folds, variant, checkpoint)
    previous = _previous_stages(paths, dataset, configs, folds, variant, checkpoint)
    everything = [*configs, *previous]

    with tempfile.TemporaryDirectory(prefix=".autoseg-export-", dir=output.parent if output.parent.is_dir()
                                     else None) as tmp:
        stage = Path(tmp) / dataset
        for config in everything:
            for fold in folds:
                tid = TrainingId(dataset, config, fold, variant)
                src, dest = paths.training_dir(tid), stage / tid.relative_dir().relative_to(dataset)
                dest.mkdir(parents=True)
                _weights_only_copy(checkpoint_file(src, checkpoint), dest / f"checkpoint_{checkpoint}.pt")
                for name in FOLD_RECORDS:
                    if (src / name).is_file():
                        shutil.copyfile(src / name, dest / name)
        first_fold = paths.training_dir(TrainingId(dataset, everything[0], folds[0], variant))
        _copy_first("dataset.json", (paths.raw_dataset(dataset) / "dataset.json", first_fold / "dataset.json"),
                    stage / "dataset.json")
        by_preset = {TrainingId(dataset, c, 0).plans: c for c in reversed(everything)}  # first config wins
        for preset, config in by_preset.items():
            plans_file = paths.plans_file(dataset, preset)
            fold_copy = paths.training_dir(TrainingId(dataset, config, folds[0], variant)) / "plans.json"
            _copy_first(plans_file.name, (plans_file, fold_copy), stage / plans_file.name)
        best = paths.results_dataset(dataset) / BEST_FILE
        has_best = best.is_file() and _best_fits(best, everything, folds, variant, checkpoint)
        if has_best:
            shutil.copyfile(best, stage / BEST_FILE)
        files = tuple(ManifestFile(p.relative_to(stage).as_posix(), p.stat().st_size, sha256_of(p))
                      for p in sorted(stage.rglob("*")) if p.is_file())
        manifest = ModelManifest(autoseg.__version__, dataset, tuple(configs), tuple(folds), variant, checkpoint,
                                 files, has_best, tuple(previous))
        atomic_write_json(stage / MANIFEST_FILE, record_to_dict(manifest))

        def write_zip(f) -> None:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.write(stage / MANIFEST_FILE, f"{dataset}/{MANIFEST_FILE}")
                for entry in files:
                    zf.write(stage / entry.path, f"{dataset}/{entry.path}")

        atomic_write_with(output, write_zip)
    return manifest


# --------------------------------------------------------------------------- install


def _member_problem(info: zipfile.ZipInfo, dataset: str | None) -> str | None:
    """Why a zip member may not be extracted, or None."""
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if "\\" in name or "\0" in name:
        return "has a backslash or NUL in its name"
    pure = PurePosixPath(name)
    if pure.is_absolute() or (pure.parts and pure.parts[0].endswith(":")):
        return "is an absolute path"
    if ".." in pure.parts:
        return "contains '..'"
    if not pure.parts or (dataset is not None and pure.parts[0] != dataset):
        return f"is outside the model folder {dataset}/"
    return None


def _check_folder_names(manifest: ModelManifest, where: str | Path) -> None:
    """Configurations and the variant name results folders: one plain path component each."""
    for name in (*manifest.configs, *manifest.previous_stages, manifest.variant):
        if not FOLDER_NAME_RE.match(name):
            raise AutosegError(f"manifest names folder {name!r}, not a plain folder name", where)


def _read_manifest(zf: zipfile.ZipFile, zip_path: Path) -> ModelManifest:
    tops = {PurePosixPath(i.filename).parts[0] for i in zf.infolist() if PurePosixPath(i.filename).parts}
    names = [n for n in zf.namelist() if PurePosixPath(n).parts[-1:] == (MANIFEST_FILE,)
             and len(PurePosixPath(n).parts) == 2]
    if len(names) != 1:
        raise AutosegError(f"not an autoseg model: expected one <dataset>/{MANIFEST_FILE}, found {len(names)} "
                           f"(top folders: {sorted(tops)})", zip_path)
    where = f"{zip_path}:{names[0]}"
    if zf.getinfo(names[0]).file_size > MAX_MANIFEST_SIZE:
        raise AutosegError(f"manifest declares {zf.getinfo(names[0]).file_size} bytes, more than any model's; "
                           "nothing was installed", where)
    try:
        data = json.loads(zf.read(names[0]).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AutosegError(f"manifest is not valid JSON ({e})", where) from None
    manifest = record_from_dict(ModelManifest, data, where=where)
    if PurePosixPath(names[0]).parts[0] != manifest.dataset or not DATASET_NAME_RE.match(manifest.dataset):
        raise AutosegError(f"manifest names dataset {manifest.dataset!r} but sits in {names[0]}", zip_path)
    _check_folder_names(manifest, where)
    return manifest


def _verify(zf: zipfile.ZipFile, zip_path: Path, manifest: ModelManifest, limits: UnpackLimits,
            space_at: Path | None) -> None:
    """Every member safe and listed, sizes within ``limits``, every listed file present with its size and sha256."""
    ds = manifest.dataset
    listed = {f"{ds}/{f.path}": f for f in manifest.files}
    for info in zf.infolist():
        problem = _member_problem(info, ds)
        if problem is None and not info.is_dir() and len(PurePosixPath(info.filename).parts) < 2:
            problem = f"is outside the model folder {ds}/"
        if problem is not None:
            raise AutosegError(f"refused: member {info.filename!r} {problem}; nothing was installed", zip_path)
        if info.is_dir() or info.filename == f"{ds}/{MANIFEST_FILE}":
            continue
        if info.filename not in listed:
            raise AutosegError(f"member {info.filename!r} is not in the manifest; nothing was installed", zip_path)
    present = set(zf.namelist())
    for name, entry in listed.items():
        if name not in present:
            raise AutosegError(f"{name} is listed in the manifest but missing from the zip", zip_path)
    check_declared_sizes(zf, zip_path, {name: entry.size for name, entry in listed.items()}, limits, space_at)
    for name, entry in listed.items():
        h, size = hashlib.sha256(), 0
        with zf.open(name) as f:
            for chunk in read_declared(f, entry.size, name):
                h.update(chunk)
                size += len(chunk)
        if size != entry.size or h.hexdigest() != entry.sha256:
            raise AutosegError(f"{name}: checksum mismatch (size {size} vs {entry.size} in the manifest; the file "
                               "was changed or damaged); nothing was installed", zip_path)


def inspect_model_zip(zip_path: Path, limits: UnpackLimits | None = None, space_at: Path | None = None
                      ) -> ModelManifest:
    """The manifest of a model zip, after checking every member (no extraction).

    ``limits`` caps what it may unpack (default `UnpackLimits()`); ``space_at`` is the folder it
    would unpack into, whose free space must hold it (None: not checked).
    """
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise AutosegError("model zip not found", zip_path)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():  # refuse hostile names before reading anything else
                problem = _member_problem(info, None)
                if problem is not None:
                    raise AutosegError(f"refused: member {info.filename!r} {problem}; nothing was installed",
                                       zip_path)
            manifest = _read_manifest(zf, zip_path)
            _verify(zf, zip_path, manifest, limits or UnpackLimits(), space_at)
    except zipfile.BadZipFile as e:
        raise AutosegError(f"not a readable zip file ({e})", zip_path) from None
    return manifest


def install_model(paths: Paths, zip_path: Path, force: bool = False,
                  limits: UnpackLimits | None = None) -> tuple[ModelManifest, Path]:
    """Verify ``zip_path`` and unpack it as ``results/<dataset>/``; ``force`` replaces an existing folder.

    ``limits`` caps the unpacked size and compression ratio (default `UnpackLimits()`); the
    results root's filesystem must have room for it too.
    """
    zip_path = Path(zip_path)
    manifest = inspect_model_zip(zip_path, limits, space_at=paths.results)
    target = paths.results_dataset(manifest.dataset)
    if target.exists():
        if not (target / MANIFEST_FILE).is_file():
            raise AutosegError("holds training results, not an installed model; install-model never replaces "
                               "them (move the folder away, or install into another --results root)", target)
        if not force:
            raise AutosegError("a model is already installed here; use --force to replace it", target)
    paths.results.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".install-{manifest.dataset}-", dir=paths.results))
    old = None
    try:
        with zipfile.ZipFile(zip_path) as zf:
            manifest_size = zf.getinfo(f"{manifest.dataset}/{MANIFEST_FILE}").file_size
            for entry in (*manifest.files, ManifestFile(MANIFEST_FILE, manifest_size, "")):
                dest = tmp / entry.path
                if tmp.resolve() not in dest.resolve().parents:  # belt and braces after _member_problem
                    raise AutosegError(f"refused: member {entry.path!r} escapes the target", zip_path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(f"{manifest.dataset}/{entry.path}") as src, open(dest, "wb") as out:
                    for chunk in read_declared(src, entry.size, entry.path):
                        out.write(chunk)
        for entry in manifest.files:  # what landed on disk is what was verified
            if sha256_of(tmp / entry.path) != entry.sha256:
                raise AutosegError(f"{entry.path}: checksum mismatch after extraction", tmp / entry.path)
        if target.exists():
            # an empty fresh folder to rename over: no clash with a leftover of an earlier crash
            old = Path(tempfile.mkdtemp(prefix=f".replaced-{manifest.dataset}-", dir=paths.results))
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if target.exists():  # failed before the old model moved: only the empty placeholder to drop
                with contextlib.suppress(OSError):
                    old.rmdir()
            else:
                os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return manifest, target


# --------------------------------------------------------------------------- model folders


def open_model_folder(folder: Path) -> ModelFolder:
    """A model folder for ``predict -m``: ``.../DatasetXXX_Name/`` or a folder holding exactly one.

    Its parent acts as the results root, so predict reads it like a training's results.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise AutosegError("model folder not found", folder)
    if not DATASET_NAME_RE.match(folder.name):
        inner = [d for d in folder.iterdir() if d.is_dir() and DATASET_NAME_RE.match(d.name)]
        if len(inner) != 1:
            raise AutosegError("not a model folder: give the DatasetXXX_Name folder of an installed or unzipped "
                               "model", folder)
        folder = inner[0]
    manifest = None
    if (folder / MANIFEST_FILE).is_file():
        manifest = load_record(folder / MANIFEST_FILE, ModelManifest)
        _check_folder_names(manifest, folder / MANIFEST_FILE)
        if manifest.dataset != folder.name:
            raise AutosegError(f"manifest is for {manifest.dataset}, the folder is {folder.name}",
                               folder / MANIFEST_FILE)
    return ModelFolder(folder.parent, folder.name, manifest)


@dataclass(frozen=True)
class ModelSelection:
    """What ``predict -m`` predicts with: a results root (the model folder's parent) and the choice in it."""

    paths: Paths
    dataset: str
    configs: tuple[str, ...]
    folds: tuple[int | str, ...]
    variant: str
    checkpoint: str
    best_file: Path | None
    """best.json to predict with (configurations, folds and postprocessing); None = configs/folds above."""


def select_from_model_folder(paths: Paths, folder: Path, dataset: str | int | None = None, configs: Sequence[str] = (),
                             folds: Sequence[int | str] = (), variant: str | None = None,
                             checkpoint: str | None = None, best_file: Path | None = None) -> ModelSelection:
    """``predict -m``: what to predict with from a model folder, with no raw or preprocessed data.

    ``dataset`` (a name or id, optional) must be the folder's. Given ``configs``/``folds``/``best_file`` win; otherwise the folder's best.json (find-best's
    choice and postprocessing), else its manifest's configurations and folds. ``variant`` and
    ``checkpoint`` default to the manifest's. Raw and preprocessed roots are kept as given (unused).
    """
    model = open_model_folder(folder)
    root = Paths(raw=paths.raw, preprocessed=paths.preprocessed, results=model.results_root)
    if dataset is not None and root.resolve_dataset(dataset) != model.dataset:
        raise AutosegError(f"-d {dataset} but the model folder holds {model.dataset}", model.path)
    m = model.manifest
    variant = variant or (m.variant if m else "default")
    checkpoint = checkpoint or (m.checkpoint if m else "final")
    if best_file is None and not configs and not folds and model.best_file is not None:
        best_file = model.best_file
    if best_file is not None:
        return ModelSelection(root, model.dataset, (), (), variant, checkpoint, Path(best_file))
    if not configs:
        if m is None:
            raise AutosegError("no manifest.json or best.json here: give -c CONFIG", model.path)
        if len(m.configs) != 1:
            raise AutosegError(f"the model holds configurations {list(m.configs)}: choose with -c", model.path)
        configs = m.configs
    if not folds:
        if m is None:
            raise AutosegError("no manifest.json here: give -f FOLDS", model.path)
        folds = m.folds
    return ModelSelection(root, model.dataset, tuple(configs), tuple(folds), variant, checkpoint, None)
