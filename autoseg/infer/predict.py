"""Predict new images with trained folds: raw image in, mask in the input's own geometry out.

A case goes through exactly the training preprocessing (`autoseg.preprocess.preprocess_case`),
each fold's network predicts it with Gaussian-weighted sliding windows and mirroring TTA,
the softmax probabilities are averaged over folds, resampled back with
`autoseg.preprocess.revert_preprocessing`, averaged over configurations (an ensemble), and
the argmax is written with the input's shape, spacing, origin, direction and file format.
Region-based models (`autoseg.dataset.spec.LabelScheme` with regions) give sigmoid
probabilities per region instead, averaged the same way, and the label map is built by
``regions_class_order`` (later regions overwrite earlier ones where their probability > 0.5).

Input folders follow nnU-Net's convention: ``CASE_0000<ending>``, ``CASE_0001<ending>``, ...
one file per channel. Outputs are ``CASE<ending>``; ``--save-probabilities`` adds
``CASE.npz`` (key ``probabilities``, (K, z, y, x) float16; one channel per region for
region-based models) and ``CASE.json`` (a
`ProbabilityRecord` with the geometry), written last, so they can be ensembled later.

A cascade configuration (3d_cascade_fullres) also needs the previous stage's segmentation as
input channels; `load_configuration` attaches its source (`autoseg.infer.cascade`).
"""

from __future__ import annotations

import io
import itertools
import logging
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import atomic_write_bytes, load_record, save_record
from autoseg.common.paths import DEFAULT_PLANS, Paths, TrainingId
from autoseg.common.progress import progress
from autoseg.data.augment import training_mirror_axes
from autoseg.data.cascade import one_hot_foreground
from autoseg.dataset.io import SUPPORTED_ENDINGS, Geometry, file_ending, read_case, read_image, write_image
from autoseg.dataset.spec import LabelScheme, LabelValue, warn_stray_files
from autoseg.infer.cascade import seg_to_preprocessed_grid
from autoseg.infer.sliding_window import DEFAULT_BATCH_SIZE, DEFAULT_STEP, predict_sliding_window
from autoseg.nets.unet import build_unet
from autoseg.planning.plans import Configuration, Plan
from autoseg.preprocess import preprocess_case, revert_preprocessing
from autoseg.train.checkpoint import load_checkpoint, load_model_state

log = logging.getLogger(__name__)

CHECKPOINT_CHOICES = ("final", "best", "latest")
"""Which checkpoint file of a fold to load: checkpoint_<choice>.pt."""

PROBABILITY_KEY = "probabilities"
"""Array name inside CASE.npz."""

CHANNEL_FILE_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
"""Prefixes torch.compile and DistributedDataParallel add to state-dict keys."""


@dataclass
class LoadedModel:
    """The networks of one configuration (one per fold) plus what is needed to use them."""

    nets: list[nn.Module]
    plan: Plan
    config: Configuration
    mirror_axes: tuple[int, ...]
    device: torch.device
    sources: tuple[str, ...] = ()
    """Checkpoint files the nets came from (for messages and records)."""
    previous_stage: PreviousStage | None = None
    """Cascade configurations only: where the previous stage's segmentation comes from."""

    @property
    def num_classes(self) -> int:
        return self.plan.num_classes


@dataclass(frozen=True)
class PreviousStage:
    """Where a cascade model gets the previous stage's segmentation; exactly one source is set."""

    model: LoadedModel | None = None
    """Predict the previous stage with this model (its folds averaged)."""
    folder: Path | None = None
    """Read ``CASE<ending>`` label maps in the input's geometry from this folder."""
    exports: dict[str, Path] | None = None
    """Case id -> (1, *spatial) segmentation already on this configuration's grid (CV exports)."""

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.model, self.folder, self.exports)) != 1:
            raise ValueError("PreviousStage needs exactly one of model, folder, exports")


@dataclass(frozen=True)
class PredictOptions:
    """How to run the networks (not what to predict)."""

    step: float = DEFAULT_STEP
    tta: bool = True
    batch_size: int = DEFAULT_BATCH_SIZE
    amp: bool | None = None
    """bf16 autocast; None = on for CUDA, off on the CPU."""


@dataclass(frozen=True)
class ProbabilityRecord:
    """Sidecar of CASE.npz: which case, which geometry, which labels; written after the npz."""

    SCHEMA: ClassVar[str] = "autoseg.probabilities"
    VERSION: ClassVar[int] = 1

    case_id: str
    geometry: Geometry
    labels: dict[str, LabelValue]
    file_ending: str
    sources: tuple[str, ...] = ()
    regions_class_order: tuple[int, ...] = ()
    """Region probabilities only: how they become a label map (see `LabelScheme`)."""

    @property
    def label_scheme(self) -> LabelScheme:
        return LabelScheme.from_labels(self.labels, self.regions_class_order)


@dataclass(frozen=True)
class FolderResult:
    """What `predict_folder` did."""

    written: tuple[str, ...]
    skipped: tuple[str, ...]
    output_dir: Path
    notes: tuple[str, ...] = field(default_factory=tuple)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` means CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AutosegError("CUDA was requested but no GPU is available", "--device")
    return dev


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def checkpoint_file(fold_dir: Path, checkpoint: str = "final") -> Path:
    """The checkpoint path of a fold; an AutosegError naming it when absent."""
    if checkpoint not in CHECKPOINT_CHOICES:
        raise AutosegError(f"unknown checkpoint {checkpoint!r} (choose {', '.join(CHECKPOINT_CHOICES)})",
                           "--checkpoint")
    path = Path(fold_dir) / f"checkpoint_{checkpoint}.pt"
    if not path.is_file():
        hint = " (training not finished? try --checkpoint best or latest)" if checkpoint == "final" else ""
        raise AutosegError(f"checkpoint not found{hint}", path)
    return path


def _other_checkpoints(fold_dir: Path, checkpoint: str) -> str:
    """What to try when ``checkpoint_<checkpoint>.pt`` of a fold cannot be loaded."""
    others = [f"--checkpoint {c}" for c in CHECKPOINT_CHOICES
              if c != checkpoint and (fold_dir / f"checkpoint_{c}.pt").is_file()]
    if others:
        return "try " + " or ".join(others)
    return "this fold has no other checkpoint: retrain it (autoseg train ... --force)"


def prepare_network(net: nn.Module) -> nn.Module:
    """Inference mode: eval(), deep supervision off (only the full-resolution output)."""
    base = getattr(net, "_orig_mod", net)
    if hasattr(base, "deep_supervision"):
        base.deep_supervision = False
    return net.eval()


def load_model(fold_dirs: Sequence[Path], device: str | torch.device = "cpu",
               checkpoint: str = "final") -> LoadedModel:
    """Rebuild every fold's network from its checkpoint; all folds must share plan and configuration."""
    if not fold_dirs:
        raise AutosegError("no folds given", "-f")
    device = resolve_device(device)
    nets, sources = [], []
    plan = config = mirror = None
    for fold_dir in fold_dirs:
        path = checkpoint_file(Path(fold_dir), checkpoint)
        ckpt = load_checkpoint(path, map_location="cpu", hint=_other_checkpoints(Path(fold_dir), checkpoint))
        cfg = ckpt.plan.configuration(ckpt.config_name)
        if plan is None:
            plan, config = ckpt.plan, cfg
            mirror = tuple(training_mirror_axes(cfg, ckpt.trainer_config.augment))
        elif ckpt.plan != plan or cfg != config:
            raise AutosegError(f"plan or configuration differs from {sources[0]}; folds of one "
                               "configuration must come from the same plan", path)
        net = build_unet(cfg, ckpt.num_input_channels, ckpt.num_classes,
                         deep_supervision=bool(ckpt.trainer_config.deep_supervision))
        load_model_state(net, _strip_wrappers(ckpt.model_state), path)
        nets.append(prepare_network(net.to(device)))
        sources.append(str(path))
    return LoadedModel(nets=nets, plan=plan, config=config, mirror_axes=mirror or (), device=device,
                       sources=tuple(sources))


def fold_dirs_for(paths: Paths, dataset: str, config: str, folds: Sequence[int | str],
                  variant: str = "default", plans: str = DEFAULT_PLANS) -> list[Path]:
    """results/<dataset>/[<plans>__]<config>/<variant>/fold_<k>/ for each fold."""
    return [paths.training_dir(TrainingId(dataset, config, f, variant, plans=plans)) for f in folds]


def load_configuration(paths: Paths, dataset: str, config: str, folds: Sequence[int | str],
                       variant: str = "default", device: str | torch.device = "cpu", checkpoint: str = "final",
                       prev_stage_dir: Path | None = None, plans: str = DEFAULT_PLANS) -> LoadedModel:
    """`load_model` of one configuration's folds; a cascade also gets its previous stage.

    That is ``prev_stage_dir`` (existing label maps in the inputs' geometry) when given, else
    the previous configuration's model with the same variant, folds, checkpoint and plans.
    ``config`` may name its plans as its results folder does (``resenc-l__3d_fullres``).
    """
    tid = TrainingId(dataset, config, 0, variant, plans=plans)
    config, plans = tid.config, tid.plans
    model = load_model(fold_dirs_for(paths, dataset, config, folds, variant, plans), device, checkpoint)
    prev = model.config.previous_stage
    if prev is None:
        return model
    if prev_stage_dir is not None:
        if not Path(prev_stage_dir).is_dir():
            raise AutosegError("previous-stage predictions folder not found", prev_stage_dir)
        model.previous_stage = PreviousStage(folder=Path(prev_stage_dir))
    else:
        model.previous_stage = PreviousStage(model=load_configuration(paths, dataset, prev, folds, variant, device,
                                                                      checkpoint, plans=plans))
    return model


def _logits_3d(net: nn.Module, data: torch.Tensor, model: LoadedModel, options: PredictOptions) -> torch.Tensor:
    """Logits (K, *spatial) of a preprocessed (C, *spatial) volume; 2D configs go slice by slice on axis 0."""
    mirror = model.mirror_axes if options.tta else ()
    kwargs = dict(num_classes=model.num_classes, step=options.step, mirror_axes=mirror,
                  batch_size=options.batch_size, device=model.device, amp=options.amp)
    def run(results_device: torch.device) -> torch.Tensor:
        if model.config.ndim == 3:
            return predict_sliding_window(net, data, model.config.patch_size, results_device=results_device,
                                          **kwargs)
        slices = [predict_sliding_window(net, data[:, z], model.config.patch_size, results_device=results_device,
                                         **kwargs) for z in range(data.shape[1])]
        return torch.stack(slices, dim=1)

    if model.device.type != "cuda":
        return run(model.device)
    try:
        return run(model.device)
    except torch.cuda.OutOfMemoryError:
        # the whole-volume accumulator did not fit next to the network: keep it in host memory
        log.warning("GPU memory too small for a volume of shape %s; accumulating on the CPU", tuple(data.shape))
        torch.cuda.empty_cache()
        return run(torch.device("cpu"))


@dataclass(frozen=True)
class PreparedCase:
    """A case read and preprocessed once per model (the CPU half of prediction)."""

    geometry: Geometry
    inputs: tuple[tuple[np.ndarray, Any], ...]
    """Per model: preprocessed data (C, *spatial) and its CaseProperties. A cascade model's data
    already holds the previous stage's one-hot channels unless they must be predicted first."""
    previous: tuple["PreparedCase | None", ...] = ()
    """Per model: the case prepared for the previous-stage model that must predict it first, or None."""


def case_id_of(image_files: Sequence[Path]) -> str:
    """``CASE`` from ``CASE_0000<ending>`` (nnU-Net's channel naming)."""
    name = Path(image_files[0]).name
    stem = name[: -len(file_ending(name))] if file_ending(name) else name
    m = CHANNEL_FILE_RE.match(stem)
    return m.group("case") if m else stem


def _with_previous_stage(model: LoadedModel, data_pp: np.ndarray, seg_pp: np.ndarray) -> np.ndarray:
    """Image channels followed by one-hot classes 1..K-1 of the previous stage (the cascade's input)."""
    if tuple(seg_pp.shape[-data_pp.ndim + 1:]) != tuple(data_pp.shape[1:]):
        raise AutosegError(f"previous-stage segmentation has shape {tuple(seg_pp.shape)}, the preprocessed "
                           f"case {tuple(data_pp.shape[1:])}")
    return np.concatenate([data_pp, one_hot_foreground(np.asarray(seg_pp).reshape(data_pp.shape[1:]),
                                                       model.num_classes)])


def _previous_stage_input(model: LoadedModel, data: np.ndarray, geometry: Geometry, data_pp: np.ndarray,
                          props: Any, case_id: str, image_files: Sequence[Path] | None
                          ) -> tuple[np.ndarray, "PreparedCase | None"]:
    """A cascade model's input when the segmentation is at hand, or the case prepared for its previous stage."""
    source = model.previous_stage
    if source is None:
        raise AutosegError(f"{model.config.name} needs the segmentation of {model.config.previous_stage} "
                           "(load it with load_configuration, or give --prev-stage-predictions)",
                           model.sources[0] if model.sources else None)
    if source.model is not None:
        return data_pp, prepare_case([source.model], data=data, geometry=geometry, case_id=case_id)
    if source.exports is not None:
        if case_id not in source.exports:
            raise AutosegError(f"no previous-stage segmentation for case {case_id!r}", model.config.name)
        return _with_previous_stage(model, data_pp, np.load(source.exports[case_id])), None
    ending = file_ending(image_files[0]) if image_files else ".nii.gz"
    path = Path(source.folder) / f"{case_id}{ending}"  # type: ignore[arg-type]
    if not path.is_file():
        raise AutosegError(f"previous-stage prediction of case {case_id!r} not found", path)
    seg, seg_geometry = read_image(path)
    if not seg_geometry.same_grid(geometry):
        raise AutosegError("previous-stage prediction is not on the image's grid", path)
    grid = seg_to_preprocessed_grid(np.asarray(seg), props, model.plan, model.config)
    return _with_previous_stage(model, data_pp, grid), None


def prepare_case(models: Sequence[LoadedModel], image_files: Sequence[Path] | None = None,
                 data: np.ndarray | None = None, geometry: Geometry | None = None,
                 case_id: str | None = None) -> PreparedCase:
    """Read (unless ``data``/``geometry`` are given) and preprocess one case for every model.

    ``case_id`` (default: from the first file name) finds a cascade's previous-stage segmentation.
    """
    if not models:
        raise AutosegError("no model to predict with")
    if data is None or geometry is None:
        data, geometry = read_case(list(image_files or ()))
    if case_id is None:
        case_id = case_id_of(image_files) if image_files else ""
    inputs, previous = [], []
    for model in models:
        if model.num_classes != models[0].num_classes or model.plan.labels != models[0].plan.labels:
            raise AutosegError("models of an ensemble must predict the same labels",
                               model.sources[0] if model.sources else None)
        if data.shape[0] != model.plan.num_channels:
            raise AutosegError(f"case has {data.shape[0]} channel(s), the model expects {model.plan.num_channels}",
                               image_files[0] if image_files else None)
        check_dimensionality(model.config, geometry, image_files[0] if image_files else None)
        data_pp, _, props, _ = preprocess_case(data, geometry, None, model.plan, model.config)
        before = None
        if model.config.previous_stage is not None:
            data_pp, before = _previous_stage_input(model, data, geometry, data_pp, props, case_id, image_files)
        inputs.append((data_pp, props))
        previous.append(before)
    return PreparedCase(geometry, tuple(inputs), tuple(previous))


def check_dimensionality(config: Configuration, geometry: Geometry, where: Path | None) -> None:
    """Refuse a 2D image (2D file or one-slice volume) for a 3D configuration: its patch would slide
    over zero padding and write a mask it never learned to make. A 2d configuration takes both."""
    if config.ndim == 3 and (geometry.file_ndim == 2 or geometry.shape[0] == 1):
        kind = "a 2D image" if geometry.file_ndim == 2 else "a volume of one slice"
        raise AutosegError(f"input is {kind} (shape {geometry.shape}); the {config.name} model needs 3D volumes "
                           "(use a 2d configuration)", where)


def model_input(model: LoadedModel, case: PreparedCase, index: int,
                options: PredictOptions = PredictOptions()) -> np.ndarray:
    """Model ``index``'s network input (C, *spatial): a cascade first predicts its previous stage if needed."""
    data_pp, props = case.inputs[index]
    before = case.previous[index] if case.previous else None
    if before is None:
        return data_pp
    source = model.previous_stage.model  # type: ignore[union-attr]
    seg = labels_from_probabilities(predict_prepared([source], before, options), source.plan.label_scheme)
    return _with_previous_stage(model, data_pp, seg_to_preprocessed_grid(seg, props, model.plan, model.config))


def model_probabilities(model: LoadedModel, data_pp: np.ndarray,
                        options: PredictOptions = PredictOptions()) -> np.ndarray:
    """Softmax (or per-region sigmoid) (K, *preprocessed spatial) float32 of one model, averaged over its folds."""
    x = torch.from_numpy(np.ascontiguousarray(data_pp, dtype=np.float32))
    probs = None
    regions = model.plan.label_scheme.has_regions
    for net in model.nets:
        logits = _logits_3d(net, x, model, options)
        p = torch.sigmoid(logits) if regions else torch.softmax(logits, dim=0)
        probs = p if probs is None else probs + p
    return (probs / len(model.nets)).cpu().numpy()


def predict_prepared(models: Sequence[LoadedModel], case: PreparedCase,
                     options: PredictOptions = PredictOptions()) -> np.ndarray:
    """Class probabilities (K, z, y, x) float32 in the input's grid, averaged over folds and models."""
    total: np.ndarray | None = None
    for i, (model, (_, props)) in enumerate(zip(models, case.inputs)):
        probs = model_probabilities(model, model_input(model, case, i, options), options)
        reverted = revert_preprocessing(probs, props, model.plan, model.config).astype(np.float32, copy=False)
        total = reverted if total is None else total + reverted
    return np.asarray(total) / len(models)


def predict_probabilities(models: Sequence[LoadedModel], data: np.ndarray, geometry: Geometry,
                          options: PredictOptions = PredictOptions()) -> np.ndarray:
    """Class probabilities (K, z, y, x) for an image already in memory ((C, z, y, x) float32)."""
    return predict_prepared(models, prepare_case(models, data=data, geometry=geometry), options)


def labels_from_probabilities(probs: np.ndarray, scheme: LabelScheme | None = None) -> np.ndarray:
    """The label map as the smallest unsigned integer type that holds the labels.

    Argmax over classes; with a region ``scheme``, regions_class_order (`LabelScheme.label_map`).
    """
    if scheme is not None:
        return scheme.label_map(probs)
    dtype = np.uint8 if probs.shape[0] <= 256 else np.uint16
    return np.argmax(probs, axis=0).astype(dtype)


def predict_case(models: Sequence[LoadedModel], image_files: Sequence[Path],
                 options: PredictOptions = PredictOptions(), return_probabilities: bool = False,
                 case_id: str | None = None) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """(label map (z, y, x), probabilities (K, z, y, x) or None, the input's geometry) for one case."""
    case = prepare_case(models, image_files, case_id=case_id)
    probs = predict_prepared(models, case, options)
    seg = labels_from_probabilities(probs, models[0].plan.label_scheme)
    return seg, (probs if return_probabilities else None), case.geometry


# --------------------------------------------------------------------------- folders


def group_case_files(input_dir: Path, num_channels: int, ending: str | None = None
                     ) -> tuple[dict[str, list[Path]], str]:
    """Map case id -> channel files (``CASE_XXXX<ending>``), checking every channel is present."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise AutosegError("input folder not found", input_dir)
    files = [f for f in sorted(input_dir.iterdir()) if not f.name.startswith(".") and
             (f.is_file() or f.is_symlink())]
    if ending is None:
        endings = {file_ending(f) for f in files if file_ending(f) in SUPPORTED_ENDINGS}
        if not endings:
            raise AutosegError(f"no images ({', '.join(SUPPORTED_ENDINGS)}) found", input_dir)
        if len(endings) > 1:
            raise AutosegError(f"images with several endings {sorted(endings)}; keep one format per folder",
                               input_dir)
        ending = endings.pop()
    cases: dict[str, list[Path | None]] = {}
    warn_stray_files([f for f in files if not f.name.endswith(ending)], input_dir, ending)
    for f in files:
        if not f.name.endswith(ending):
            continue
        m = CHANNEL_FILE_RE.match(f.name[: -len(ending)])
        if not m:
            raise AutosegError(f"input file names must end in _XXXX{ending} (channel index, nnU-Net layout)", f)
        ch = int(m.group("channel"))
        if ch >= num_channels:
            raise AutosegError(f"channel {ch} but the model takes {num_channels} channel(s)", f)
        cases.setdefault(m.group("case"), [None] * num_channels)[ch] = f
    if not cases:
        raise AutosegError(f"no images ending in {ending!r}", input_dir)
    for cid, chans in cases.items():
        missing = [i for i, c in enumerate(chans) if c is None]
        if missing:
            raise AutosegError(f"case {cid!r} lacks channel file {cid}_{missing[0]:04d}{ending}", input_dir)
    return {cid: [c for c in chans if c is not None] for cid, chans in cases.items()}, ending


def _save_npz(path: Path, probs: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{PROBABILITY_KEY: probs.astype(np.float16)})
    atomic_write_bytes(path, buf.getvalue())


def write_probabilities(out_dir: Path, case_id: str, probs: np.ndarray, geometry: Geometry,
                       labels: dict[str, LabelValue], ending: str, sources: Sequence[str] = (),
                       regions_class_order: Sequence[int] = ()) -> None:
    """CASE.npz then CASE.json (the json marks the pair complete)."""
    _save_npz(Path(out_dir) / f"{case_id}.npz", probs)
    save_record(Path(out_dir) / f"{case_id}.json",
                ProbabilityRecord(case_id, geometry, dict(labels), ending, tuple(sources),
                                  tuple(regions_class_order)))


def load_probabilities(folder: Path, case_id: str) -> tuple[np.ndarray, ProbabilityRecord]:
    """Read CASE.npz + CASE.json written by `write_probabilities` or `predict_folder`."""
    rec = load_record(Path(folder) / f"{case_id}.json", ProbabilityRecord)
    npz = Path(folder) / f"{case_id}.npz"
    if not npz.is_file():
        raise AutosegError("probability file missing next to its json", npz)
    with np.load(npz) as z:
        probs = z[PROBABILITY_KEY].astype(np.float32)
    if tuple(probs.shape[1:]) != tuple(rec.geometry.shape):
        raise AutosegError(f"probabilities shape {probs.shape} does not match geometry {rec.geometry.shape}", npz)
    return probs, rec


def _case_done(out_dir: Path, case_id: str, ending: str, with_probs: bool) -> bool:
    done = (out_dir / f"{case_id}{ending}").is_file()
    return done and (not with_probs or (out_dir / f"{case_id}.json").is_file())


def _prefetched(models: Sequence[LoadedModel], jobs: Sequence[tuple[str, Sequence[Path]]],
                num_workers: int) -> Iterator[tuple[str, PreparedCase]]:
    """(case id, prepared case) in order, preparing up to ``num_workers + 1`` cases ahead in threads."""
    workers = max(1, num_workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autoseg-prepare") as pool:
        pending: deque = deque()
        it = iter(jobs)
        for cid, files in itertools.islice(it, workers + 1):
            pending.append((cid, pool.submit(prepare_case, models, files, case_id=cid)))
        while pending:
            cid, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(prepare_case, models, nxt[1], case_id=nxt[0])))
            try:
                yield cid, fut.result()
            except BaseException:
                for _, f in pending:
                    f.cancel()
                raise


def predict_folder(models: Sequence[LoadedModel], input_dir: Path, output_dir: Path,
                   file_ending: str | None = None, save_probabilities: bool = False, force: bool = False,
                   options: PredictOptions = PredictOptions(), postprocess=None,
                   show_progress: bool = True, num_workers: int = 1) -> FolderResult:
    """Predict every case of ``input_dir`` into ``output_dir``; finished cases are skipped unless ``force``.

    ``postprocess`` (a callable on the label map, e.g. from best.json) runs before writing.
    ``num_workers`` threads read and preprocess the next cases while the network runs
    (worth it on a GPU; 0 or 1 = one background thread, so the CPU and the GPU overlap).
    """
    if not models:
        raise AutosegError("no model to predict with")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if input_dir.resolve() == output_dir.resolve():
        raise AutosegError("output folder must differ from the input folder", output_dir)
    cases, ending = group_case_files(input_dir, models[0].plan.num_channels, file_ending)
    output_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    todo = []
    for cid in sorted(cases):
        if not force and _case_done(output_dir, cid, ending, save_probabilities):
            skipped.append(cid)
        else:
            todo.append(cid)
    if skipped:
        log.info("%d case(s) already predicted in %s; skipping them (use --force to redo)", len(skipped), output_dir)
    labels, scheme = models[0].plan.labels, models[0].plan.label_scheme
    sources = tuple(s for m in models for s in m.sources)
    for cid, case in progress(_prefetched(models, [(c, cases[c]) for c in todo], num_workers), total=len(todo),
                              desc="predict", enabled=show_progress, unit="case"):
        probs = predict_prepared(models, case, options)
        seg, geometry = labels_from_probabilities(probs, scheme), case.geometry
        if postprocess is not None:
            seg = postprocess(seg)
        if save_probabilities:
            (output_dir / f"{cid}.json").unlink(missing_ok=True)  # stale sidecar must not vouch for new data
            _save_npz(output_dir / f"{cid}.npz", probs)
        write_image(output_dir / f"{cid}{ending}", seg, geometry)
        if save_probabilities:
            save_record(output_dir / f"{cid}.json", ProbabilityRecord(cid, geometry, dict(labels), ending, sources,
                                                                          scheme.regions_class_order))
        written.append(cid)
    return FolderResult(written=tuple(written), skipped=tuple(skipped), output_dir=output_dir)


def ensemble_probabilities(folders: Sequence[Path], output_dir: Path, force: bool = False,
                           save_probabilities: bool = False, postprocess=None,
                           show_progress: bool = True) -> FolderResult:
    """Average saved probabilities of several prediction folders (same cases) and write label maps."""
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise AutosegError("ensembling needs at least two folders")
    per_folder = []
    for f in folders:
        if not f.is_dir():
            raise AutosegError("folder not found", f)
        per_folder.append({p.stem for p in f.glob("*.json") if (f / f"{p.stem}.npz").is_file()})
    common = set.intersection(*per_folder)
    if not common:
        raise AutosegError("no case has saved probabilities (CASE.npz + CASE.json) in every folder "
                           "(predict with --save-probabilities)", folders[0])
    for f, ids in zip(folders, per_folder):
        if ids != common:
            log.warning("%s: %d case(s) not present in every folder are left out", f, len(ids - common))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for cid in progress(sorted(common), total=len(common), desc="ensemble", enabled=show_progress, unit="case"):
        total, rec0 = None, None
        for f in folders:
            probs, rec = load_probabilities(f, cid)
            if rec0 is None:
                rec0 = rec
            elif (rec.labels, rec.regions_class_order) != (rec0.labels, rec0.regions_class_order) or rec.geometry.differences(rec0.geometry):
                raise AutosegError(f"case {cid!r}: labels or geometry differ from {folders[0]}", f / f"{cid}.json")
            total = probs if total is None else total + probs
        out = output_dir / f"{cid}{rec0.file_ending}"
        if out.exists() and not force:
            skipped.append(cid)
            continue
        mean = total / len(folders)
        seg = labels_from_probabilities(mean, rec0.label_scheme)
        if postprocess is not None:
            seg = postprocess(seg)
        if save_probabilities:
            write_probabilities(output_dir, cid, mean, rec0.geometry, rec0.labels, rec0.file_ending,
                                regions_class_order=rec0.regions_class_order)
        write_image(out, seg, rec0.geometry)
        written.append(cid)
    return FolderResult(written=tuple(written), skipped=tuple(skipped), output_dir=output_dir)


@dataclass(frozen=True)
class PredictRequest:
    """Everything `autoseg predict` asks for (without --best)."""

    dataset: str
    configs: tuple[str, ...]
    folds: tuple[int | str, ...]
    input_dir: Path
    output_dir: Path
    variant: str = "default"
    checkpoint: str = "final"
    device: str = "auto"
    save_probabilities: bool = False
    force: bool = False
    options: PredictOptions = PredictOptions()
    num_workers: int = 1
    """Threads that read and preprocess upcoming cases while the network runs."""
    prev_stage_dir: Path | None = None
    """Cascade configurations: existing previous-stage predictions instead of predicting them."""
    plans: str = DEFAULT_PLANS
    """The planner preset the folds were trained with (their ``<preset>__<config>`` folders)."""


def run_prediction(paths: Paths, request: PredictRequest, show_progress: bool = True) -> FolderResult:
    """Load the requested configurations and folds, then predict the input folder (an ensemble when several)."""
    if not request.configs:
        raise AutosegError("give at least one configuration", "-c")
    models = [load_configuration(paths, request.dataset, c, request.folds, request.variant, request.device,
                                 request.checkpoint, request.prev_stage_dir, request.plans) for c in request.configs]
    if request.prev_stage_dir is not None and not any(m.config.previous_stage for m in models):
        raise AutosegError(f"none of {', '.join(request.configs)} is a cascade stage (3d_cascade_fullres)",
                           "--prev-stage-predictions")
    return predict_folder(models, request.input_dir, request.output_dir,
                          save_probabilities=request.save_probabilities, force=request.force,
                          options=request.options, show_progress=show_progress, num_workers=request.num_workers)
