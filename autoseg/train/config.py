"""`TrainerConfig`: every training hyperparameter in one frozen dataclass, and `--set` parsing.

Ablations are parameters, not subclasses: ``autoseg train ... --set lr=0.005 --set
augment.mirror=false`` (and every sweep grid point) goes through `apply_overrides`, which
parses each value against the field's declared type. Defaults are nnU-Net v2's
(``nnUNetTrainer``), so a user moving from nnU-Net gets the same training by default.
The config used is saved as ``trainer_config.json`` in the fold dir and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from autoseg.common.errors import ConfigError
from autoseg.common.jsonio import to_jsonable
from autoseg.common.values import check_value, did_you_mean, on_off, parse_text
from autoseg.data.augment import AugmentConfig
from autoseg.train.losses import LOSSES
from autoseg.train.schedules import LR_SCHEDULES

OPTIMIZERS = ("sgd", "adamw")
"""``sgd``: SGD with Nesterov momentum (nnU-Net); ``adamw``: an ablation alternative."""

AMP_MODES = ("auto", "bf16", "fp16", "off")
"""``auto``: bf16 autocast on CUDA, full precision on CPU; ``fp16`` adds a GradScaler."""

HEAD_INITS = ("prior", "he")
"""How the 1x1 segmentation heads start: ``prior`` (He weights, bias = log of each class's voxel
share, see `autoseg.nets.unet.init_heads_to_prior`) or ``he`` (nnU-Net: He weights, zero bias)."""

COMPILE_MODES = ("auto", "true", "false")
"""``auto``: torch.compile on CUDA (worth it there), off on CPU (compile time dominates)."""

FINAL_VALIDATION_MODES = ("full", "no_mirroring", "off")
"""After the last epoch: ``full`` predicts every validation case with test-time mirroring
(nnU-Net); ``no_mirroring`` skips the mirrored passes (nnU-Net's ``--disable_tta``: up to 8x
faster in 3D, Dice usually a little lower); ``off`` skips the validation (a quick trial;
``--validation-only`` adds it later, find-best needs it)."""

SWITCH_WORDS: dict[str, tuple[str, str]] = {"compile": ("true", "false"), "amp": ("auto", "off")}
"""The (on, off) mode a text field takes from a boolean: YAML reads ``compile: false`` and
``amp: off`` as booleans, and users write ``--set compile=no``; ``amp: on`` means ``auto``
(bf16 on CUDA; the CPU has no useful autocast)."""

MAX_DEFAULT_WORKERS = 12
"""nnU-Net's default number of data-augmentation workers per training process."""


@dataclass(frozen=True)
class TrainerConfig:
    """Every knob of one training run, with nnU-Net v2's defaults."""

    SCHEMA: ClassVar[str] = "autoseg.trainer_config"
    VERSION: ClassVar[int] = 1

    epochs: int = 1000
    """nnU-Net trains 1000 epochs; long schedules matter more than any architecture tweak."""
    iterations_per_epoch: int = 250
    """An "epoch" is a fixed number of random patch batches, not a pass over the data (nnU-Net)."""
    val_iterations: int = 50
    """Validation batches per epoch for the online pseudo-Dice (nnU-Net: 50)."""
    lr: float = 0.01
    """Initial learning rate for SGD (nnU-Net: 1e-2)."""
    lr_schedule: str = "poly"
    """``poly``: lr * (1 - epoch/epochs) ** poly_exponent, stepped per epoch; or ``constant``."""
    poly_exponent: float = 0.9
    """Exponent of the poly schedule (nnU-Net: 0.9)."""
    optimizer: str = "sgd"
    """``sgd`` (Nesterov, as nnU-Net) or ``adamw``."""
    momentum: float = 0.99
    """SGD momentum; nnU-Net's unusually high 0.99 works with its poly schedule and grad clipping."""
    weight_decay: float = 3e-5
    """L2 weight decay (nnU-Net: 3e-5)."""
    grad_clip: float = 12.0
    """Clip the gradient norm to this (nnU-Net: 12); 0 disables clipping."""
    batch_size: int | None = None
    """Global batch size; None = the plan's (sized to the GPU memory budget)."""
    loss: str = "dice_ce"
    """Loss name in `autoseg.train.losses.LOSSES`: dice_ce (nnU-Net), dice, ce."""
    deep_supervision: bool = True
    """Supervise the decoder's lower-resolution outputs too (nnU-Net); helps gradients reach deep layers."""
    amp: str = "auto"
    """Mixed precision: auto (bf16 on CUDA, off on CPU), bf16, fp16 (with a GradScaler), off."""
    compile: str = "auto"
    """torch.compile the network: auto (on with CUDA, off on CPU), true, false."""
    head_init: str = "prior"
    """Initial segmentation heads, one of `HEAD_INITS`; ``prior`` learns every class from the start
    where nnU-Net's ``he`` depends on the seed (docs/parity.md)."""
    pretrained: str | None = None
    """Checkpoint whose weights start the run (fine-tuning, `autoseg.train.pretrained`; heads stay fresh
    when the class count differs); None trains from scratch. Used only when a run starts."""
    seed: int = 0
    """Seeds weights init and the data loaders (rank r of a DDP run uses seed + r)."""
    num_workers: int | None = None
    """Data-augmentation worker processes; None = the caller's share of the CPUs."""
    oversample_foreground: float = 0.33
    """Share of each batch forced to contain foreground (nnU-Net: 0.33); helps small structures."""
    ema_alpha: float = 0.9
    """Moving average of the pseudo-Dice: ema = alpha * ema + (1 - alpha) * dice (nnU-Net: 0.9)."""
    save_every: int = 1
    """Write checkpoint_latest.pt every this many epochs (cheap insurance against kills)."""
    final_validation: str = "full"
    """After training, one of `FINAL_VALIDATION_MODES`: ``full`` (nnU-Net), ``no_mirroring``, ``off``."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmentation switches and ranges (nnU-Net's default pipeline when left as is)."""

    def __post_init__(self) -> None:
        for key, (on, off) in SWITCH_WORDS.items():  # a boolean (YAML, Python) or on/off word -> the mode
            flag = on_off(getattr(self, key))
            if flag is not None:
                object.__setattr__(self, key, on if flag else off)
        checks: list[tuple[bool, str, str]] = [
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.iterations_per_epoch >= 1, "iterations_per_epoch", "must be >= 1"),
            (self.val_iterations >= 0, "val_iterations", "must be >= 0"),
            (self.lr > 0, "lr", "must be > 0"),
            (self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {sorted(LR_SCHEDULES)}"),
            (self.poly_exponent > 0, "poly_exponent", "must be > 0"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {list(OPTIMIZERS)}"),
            (0 <= self.momentum < 1, "momentum", "must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)"),
            (self.batch_size is None or self.batch_size >= 1, "batch_size", "must be >= 1 or none"),
            (self.loss in LOSSES, "loss", f"must be one of {sorted(LOSSES)}"),
            (self.amp in AMP_MODES, "amp", f"must be one of {list(AMP_MODES)}"),
            (self.head_init in HEAD_INITS, "head_init", f"must be one of {list(HEAD_INITS)}"),
            (self.pretrained is None or bool(str(self.pretrained).strip()), "pretrained",
             "must be a checkpoint path or none"),
            (self.compile in COMPILE_MODES, "compile", f"must be one of {list(COMPILE_MODES)}"),
            (self.num_workers is None or self.num_workers >= 0, "num_workers", "must be >= 0 or none"),
            (0 <= self.oversample_foreground <= 1, "oversample_foreground", "must be in [0, 1]"),
            (0 <= self.ema_alpha < 1, "ema_alpha", "must be in [0, 1)"),
            (self.save_every >= 1, "save_every", "must be >= 1"),
            (self.final_validation in FINAL_VALIDATION_MODES, "final_validation",
             f"must be one of {list(FINAL_VALIDATION_MODES)}"),
        ]
        for ok, key, problem in checks:
            if not ok:
                raise ConfigError(f"{problem}, got {getattr(self, key)!r}", where=key)

    def flat_dict(self) -> dict[str, Any]:
        """Plain ``{key: value}`` with augment fields as ``augment.<name>`` (logs, sweep tables)."""
        body = to_jsonable(self)
        flat = {k: v for k, v in body.items() if k != "augment"}
        flat.update({f"augment.{k}": v for k, v in body["augment"].items()})
        return flat


def changed_keys(given: TrainerConfig, used: TrainerConfig, ignore: Iterable[str] = ()
                 ) -> list[tuple[str, Any, Any]]:
    """``(key, used value, given value)`` for each key ``given`` sets away from the default and from ``used``.

    A key left at its default counts as not given, so ``--continue`` without the original
    ``--set`` flags reports nothing; only what the caller asked for and will not get is listed.
    """
    mine, theirs, default = given.flat_dict(), used.flat_dict(), TrainerConfig().flat_dict()
    skip = set(ignore)
    return [(k, theirs[k], mine[k]) for k in theirs
            if k not in skip and mine.get(k) != theirs[k] and mine.get(k) != default.get(k)]


def format_changes(changes: Iterable[tuple[str, Any, Any]]) -> str:
    """``epochs 2 -> 4, lr 0.01 -> 0.003`` (one line, for warnings)."""
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)


def default_num_workers(cpu_count: int, processes: int = 1) -> int:
    """Data workers for one training process given the CPUs it shares with ``processes`` others.

    Leaves one core per process for the training step itself, caps at nnU-Net's 12.
    """
    share = max(1, cpu_count // max(1, processes))
    return max(0, min(MAX_DEFAULT_WORKERS, share - 1))


def trainer_keys() -> dict[str, Any]:
    """Every key ``--set`` takes (``augment.<name>`` for augmentation) -> its declared type."""
    top = typing.get_type_hints(TrainerConfig)
    keys = {f.name: top[f.name] for f in dataclasses.fields(TrainerConfig) if f.name != "augment"}
    aug = typing.get_type_hints(AugmentConfig)
    keys.update({f"augment.{f.name}": aug[f.name] for f in dataclasses.fields(AugmentConfig)})
    return keys


def split_override(item: str) -> tuple[str, str]:
    """``"key=value"`` -> ``("key", "value")``; anything else is a `ConfigError`."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"expected KEY=VALUE, got {item!r}", where=item)
    return key.strip(), text.strip()


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["epochs=50", "augment.mirror=off"]`` -> ``{"epochs": 50, "augment.mirror": False}``, typed.

    Each value is parsed against the field's type (`autoseg.common.values.parse_text`); the
    last of a repeated key wins. An unknown key is a `ConfigError` naming the closest known keys.
    """
    return typed_overrides({k: v for k, v in map(split_override, overrides)}, from_text=True)


def typed_overrides(values: Mapping[str, Any], from_text: bool = False,
                    where: Callable[[str], str] = str) -> dict[str, Any]:
    """``{key: value}`` checked against `trainer_keys`: text parsed (``from_text``) or a typed (YAML)
    value checked; ``where(key)`` names the place in errors (the key itself by default)."""
    keys = trainer_keys()
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in keys:
            raise ConfigError(_unknown(key, list(keys)), where=where(key))
        tp = keys[key]
        if key in SWITCH_WORDS and on_off(value) is not None:  # compile: false, amp: off
            value = SWITCH_WORDS[key][0 if on_off(value) else 1]
        out[key] = parse_text(value, tp, where(key)) if from_text else check_value(value, tp, where(key))
    return out


def apply_overrides(cfg: TrainerConfig, overrides: Iterable[str] | Mapping[str, Any],
                    where: Callable[[str], str] = str) -> TrainerConfig:
    """Apply ``["key=value", "augment.mirror=false", ...]`` (or already typed ``{key: value}``) to ``cfg``.

    Bools take `TRUE_WORDS`/`FALSE_WORDS`, optional fields take none, tuples take ``a,b,c``
    (`autoseg.common.values.parse_text`). An unknown key is a `ConfigError` naming the closest
    known keys; a value outside a field's range is the `TrainerConfig` check's `ConfigError`.
    """
    if isinstance(overrides, Mapping):
        typed = typed_overrides(overrides, where=where)
    else:
        typed = typed_overrides(dict(map(split_override, overrides)), from_text=True, where=where)
    top = {k: v for k, v in typed.items() if not k.startswith("augment.")}
    nested = {k[len("augment."):]: v for k, v in typed.items() if k.startswith("augment.")}
    try:
        augment = dataclasses.replace(cfg.augment, **nested) if nested else cfg.augment
        return dataclasses.replace(cfg, augment=augment, **top)
    except ConfigError as e:
        raise ConfigError(e.message, where=where(e.where or "--set")) from None
    except (TypeError, ValueError) as e:  # a validation in AugmentConfig that is not a ConfigError
        raise ConfigError(str(e), where=where("--set")) from None


def _unknown(key: str, known: list[str]) -> str:
    hint = did_you_mean(key, known, n=3, cutoff=0.5)
    return f"unknown trainer key{hint or '; known keys: ' + ', '.join(known)}"
