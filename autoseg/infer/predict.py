"""Predict new images with trained folds: raw image in, mask in the input's own geometry out.

A case goes through exactly the training preprocessing (`autoseg.preprocess.preprocess_case`),
each fold's network predicts it with Gaussian-weighted sliding windows and mirroring TTA,
the logits are averaged over folds, resampled back with `autoseg.preprocess.revert_preprocessing`
and only then turned into softmax probabilities (nnU-Net's order: nnUNetv2_predict gives the same
masks), averaged over configurations (an ensemble), and the argmax is written with the input's
shape, spacing, origin, direction and file format.
One configuration without saved probabilities goes slab by slab instead (`autoseg.infer.lean`:
the same masks, memory bounded by the patch and ``PredictOptions.memory_limit``), except with
``PredictOptions.nnunet_fp16`` (stock nnU-Net's float16 arithmetic, on whole volumes).
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

import itertools
import logging
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.common.errors import AutosegError
from autoseg.common.jsonio import save_record
from autoseg.common.paths import DEFAULT_PLANS, Paths
from autoseg.common.progress import progress
from autoseg.dataset.io import SUPPORTED_ENDINGS, Geometry, file_ending, read_case, read_image, write_image
from autoseg.data.cascade import one_hot_foreground
from autoseg.preprocess import preprocess_case, revert_preprocessing
from autoseg.dataset.spec import warn_stray_files
from autoseg.infer.cascade import seg_to_preprocessed_grid
from autoseg.infer.lean import format_bytes, plan_lean, predict_labels_lean
from autoseg.infer.model import (  # noqa: F401 (re-exported: the public names of prediction stay here)
    CHECKPOINT_CHOICES,
    LoadedModel,
    PredictOptions,
    PreviousStage,
    activate,
    checkpoint_file,
    fold_dirs_for,
    load_configuration,
    load_model,
    model_logits,
    prepare_network,
    resolve_device,
    with_inference_nets,
)
from autoseg.infer.probabilities import (  # noqa: F401 (re-exported)
    PROBABILITY_KEY,
    FolderResult,
    ProbabilityRecord,
    _save_npz,
    ensemble_probabilities,
    labels_from_probabilities,
    load_probabilities,
    write_probabilities,
)
from autoseg.planning.plans import Configuration

log = logging.getLogger(__name__)

CHANNEL_FILE_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

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
    seg = predict_labels([source], before, options)
    return _with_previous_stage(model, data_pp, seg_to_preprocessed_grid(seg, props, model.plan, model.config))


def reverted_probabilities(model: LoadedModel, logits: torch.Tensor | np.ndarray, props: Any) -> np.ndarray:
    """Probabilities (K, z, y, x) float32 in the input's grid of one model's fold-averaged logits:
    the logits are resampled, then activated (softmax, or a sigmoid per region).

    Resampled logits keep the logits' dtype, as in nnU-Net (its resampling computes in float64 and
    writes its input's dtype): float16 logits (``PredictOptions.nnunet_fp16``) are resampled in
    float64 and rounded to float16 again before the nonlinearity.
    """
    regions = model.plan.label_scheme.has_regions
    array = logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    dtype = array.dtype

    def activation(x: np.ndarray) -> np.ndarray:
        return activate(x.astype(dtype, copy=False), regions)

    compute = np.float64 if dtype == np.float16 else np.float32
    return revert_preprocessing(array, props, model.plan, model.config, activation=activation,
                                dtype=compute).astype(np.float32, copy=False)


def predict_prepared(models: Sequence[LoadedModel], case: PreparedCase,
                     options: PredictOptions = PredictOptions()) -> np.ndarray:
    """Class probabilities (K, z, y, x) float32 in the input's grid: logits averaged over each
    model's folds, probabilities averaged over the models (an ensemble, as nnUNetv2_ensemble)."""

    total: np.ndarray | None = None
    for i, (model, (_, props)) in enumerate(zip(models, case.inputs)):
        logits = model_logits(model, model_input(model, case, i, options), options)
        reverted = reverted_probabilities(model, logits, props)
        del logits
        total = reverted if total is None else total + reverted
    return np.asarray(total) / len(models)


def full_path_bytes(models: Sequence[LoadedModel], case: PreparedCase) -> int:
    """Rough peak of `predict_prepared`: one fold's logits and the fold sum at network resolution,
    then the resampled logits, their probabilities pasted and averaged in the input's grid (float32 each)."""
    K = models[0].num_classes
    net = max(int(np.prod(data.shape[1:])) for data, _ in case.inputs)
    return 4 * K * (3 * net + 3 * int(np.prod(case.geometry.shape)))


def predict_labels(models: Sequence[LoadedModel], case: PreparedCase,
                   options: PredictOptions = PredictOptions()) -> np.ndarray:
    """The label map (z, y, x) of a prepared case: slab by slab for one configuration (``options.lean``),
    else argmax of `predict_prepared` (an ensemble of configurations, or ``lean=False``)."""
    if options.use_lean and len(models) == 1:
        model, props = models[0], case.inputs[0][1]
        # the shape of the network input is known before the previous stage runs: check the limit first
        channels = model.plan.num_channels + (model.num_classes - 1 if model.config.previous_stage else 0)
        budget = plan_lean(model, (channels, *props.shape_after_resampling), props, options.memory_limit,
                           options)
        log.debug("lean prediction: %d output rows per slab, estimated peak %s", budget.slab_rows,
                  budget.describe())
        return predict_labels_lean(model, model_input(model, case, 0, options), props, options, budget)
    if options.memory_limit is not None and full_path_bytes(models, case) > options.memory_limit:
        log.warning("an ensemble of configurations is predicted on whole volumes: about %s for this case, "
                    "above --memory-limit %s", format_bytes(full_path_bytes(models, case)),
                    format_bytes(options.memory_limit))
    return labels_from_probabilities(predict_prepared(models, case, options), models[0].plan.label_scheme)


def predict_case(models: Sequence[LoadedModel], image_files: Sequence[Path],
                 options: PredictOptions = PredictOptions(), return_probabilities: bool = False,
                 case_id: str | None = None) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """(label map (z, y, x), probabilities (K, z, y, x) or None, the input's geometry) for one case."""
    case = prepare_case(models, image_files, case_id=case_id)
    if not return_probabilities:
        return predict_labels(models, case, options), None, case.geometry
    probs = predict_prepared(models, case, options)
    seg = labels_from_probabilities(probs, models[0].plan.label_scheme)
    return seg, probs, case.geometry


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


def _warn_full_memory(models: Sequence[LoadedModel], case: PreparedCase, options: PredictOptions,
                      case_id: str) -> None:
    need = full_path_bytes(models, case)
    if options.memory_limit is not None and need > options.memory_limit:
        log.warning("%s: --save-probabilities keeps every class in full (about %s), above --memory-limit %s",
                    case_id, format_bytes(need), format_bytes(options.memory_limit))


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
    models = [with_inference_nets(m, options.compile_mode) for m in models]  # one per run: compiled nets are reused
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
        geometry, probs = case.geometry, None
        if save_probabilities:
            _warn_full_memory(models, case, options, cid)
            probs = predict_prepared(models, case, options)
            seg = labels_from_probabilities(probs, scheme)
        else:
            seg = predict_labels(models, case, options)
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
