"""Trained folds as networks: find and load checkpoints, and run one network over a preprocessed volume.

`LoadedModel` is one configuration's folds; `PredictOptions` says how to run them (window
step, mirroring, batch, autocast, memory limit, compilation). Used by `autoseg.infer.predict` (whole
volumes) and `autoseg.infer.lean` (slabs).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoseg.common.errors import AutosegError
from autoseg.common.paths import DEFAULT_PLANS, Paths, TrainingId
from autoseg.data.augment import training_mirror_axes
from autoseg.nets.unet import build_unet
from autoseg.train.checkpoint import load_checkpoint, load_model_state
from autoseg.infer.compiled import InferenceNet, check_compile_mode
from autoseg.infer.sliding_window import DEFAULT_BATCH_SIZE, DEFAULT_STEP, predict_sliding_window
from autoseg.planning.plans import Configuration, Plan

log = logging.getLogger(__name__)

CHECKPOINT_CHOICES = ("final", "best", "latest")
"""Which checkpoint file of a fold to load: checkpoint_<choice>.pt."""

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
    lean: bool = True
    """Label maps slab by slab (`autoseg.infer.lean`) when no probabilities are kept; False = whole volume."""
    memory_limit: int | None = None
    """Bytes the lean path may use (it picks its slab from them); None = a default slab."""
    compile: str = "auto"
    """``torch.compile`` the networks (`autoseg.infer.compiled`): auto = on the CPU once a network has
    run long enough (60 s) to win the compilation back; on; off."""
    nnunet_fp16: bool = False
    """Reproduce stock nnUNetv2_predict's float16 arithmetic (window sums, fold mean, resampled logits)
    bit for bit where possible, for users who must match their nnU-Net masks; slower and less exact
    than the float32 default. Forces the whole-volume path (``lean`` is ignored), one window per
    forward pass (``batch_size`` is ignored) and no compilation (``compile`` is ignored)."""

    @property
    def use_lean(self) -> bool:
        """Whether label maps may go slab by slab: ``lean``, unless ``nnunet_fp16`` wants whole volumes."""
        return self.lean and not self.nnunet_fp16

    @property
    def compile_mode(self) -> str:
        """``compile``, or off for ``nnunet_fp16`` (inductor's fused kernels round differently)."""
        return "off" if self.nnunet_fp16 else self.compile


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
                  batch_size=options.batch_size, device=model.device, amp=options.amp,
                  nnunet_fp16=options.nnunet_fp16)
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


def with_inference_nets(model: LoadedModel, compile_mode: str) -> LoadedModel:
    """``model`` (and its previous stage's model) with every net in an `InferenceNet` for ``compile_mode``."""
    check_compile_mode(compile_mode)
    if compile_mode == "off":
        return model
    prev = model.previous_stage
    if prev is not None and prev.model is not None:
        prev = dataclasses.replace(prev, model=with_inference_nets(prev.model, compile_mode))
    nets = [n if isinstance(n, InferenceNet) else InferenceNet(n, compile_mode) for n in model.nets]
    return dataclasses.replace(model, nets=nets, previous_stage=prev)


@torch.inference_mode()
def model_logits(model: LoadedModel, data_pp: np.ndarray, options: PredictOptions = PredictOptions()) -> torch.Tensor:
    """Logits (K, *preprocessed spatial) float32 of one model on the CPU: the mean over its folds.

    nnU-Net averages the folds' logits, not their probabilities; the nonlinearity (`activate`)
    comes only after the logits are back on the original grid. ``options.nnunet_fp16``: float16
    logits, summed and divided in float16 as stock nnU-Net does (no division for one fold).
    """
    x = torch.from_numpy(np.ascontiguousarray(data_pp, dtype=np.float32))
    total = None
    for net in model.nets:
        logits = _logits_3d(net, x, model, options).cpu()
        if not options.nnunet_fp16:
            logits = logits.float()
        total = logits if total is None else total.add_(logits)
    if options.nnunet_fp16 and len(model.nets) == 1:
        return total
    return total.div_(len(model.nets))


def activate(logits: np.ndarray, regions: bool) -> np.ndarray:
    """Probabilities of (K, ...) logits: softmax over axis 0, or a sigmoid per region (float32)."""
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    return (torch.sigmoid(t) if regions else torch.softmax(t, dim=0)).numpy()
