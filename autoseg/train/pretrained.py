"""Fine-tuning: start a run from another run's weights (nnU-Net's ``-pretrained_weights``).

`load_pretrained` reads the source checkpoint through the safe reader (``weights_only=True``,
its one-line errors); `transfer_weights` copies every tensor into the new network. The
segmentation heads (every deep-supervision head) are copied only when both networks predict
the same number of classes; otherwise they keep their fresh initialisation (the label prior
with ``head_init=prior``). Every other tensor must exist in both networks with the same shape,
or the first one that does not is named in one line, with both shapes: a different topology
means the target was not planned with ``autoseg plan TARGET --from-plans SOURCE``. Weights are
loaded only when a run starts; ``--continue`` resumes from the run's own checkpoint.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoseg.common.errors import AutosegError
from autoseg.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

HEADS_PREFIX = "heads."
"""State-dict prefix of the 1x1 segmentation heads (`autoseg.nets.unet.DynamicUNet.heads`)."""

PLAN_HINT = "plan this dataset with `autoseg plan DATASET --from-plans SOURCE` to use the pretrained topology"


@dataclass(frozen=True)
class PretrainedWeights:
    """The weights of a source checkpoint and what they were trained for."""

    path: Path
    state: dict[str, torch.Tensor]
    dataset: str
    config_name: str
    fold: int | str
    epoch: int
    num_input_channels: int
    num_classes: int


def load_pretrained(path: str | os.PathLike[str]) -> PretrainedWeights:
    """Read ``path`` with the checkpoint reader (safe load, strict format, one-line errors)."""
    file = Path(path).expanduser().resolve()
    ckpt = load_checkpoint(file, hint="--pretrained needs a checkpoint_*.pt written by `autoseg train`")
    return PretrainedWeights(path=file, state=ckpt.model_state, dataset=ckpt.dataset, config_name=ckpt.config_name,
                             fold=ckpt.fold, epoch=ckpt.epoch, num_input_channels=ckpt.num_input_channels,
                             num_classes=ckpt.num_classes)


def transfer_weights(net: nn.Module, pretrained: PretrainedWeights, num_input_channels: int,
                     num_classes: int) -> dict[str, Any]:
    """Copy ``pretrained`` into ``net`` (see the module doc); returns the record of what was done.

    Checks everything before changing anything, so a refused checkpoint leaves ``net`` as it was.
    """
    where = pretrained.path
    own = net.state_dict()
    first = next(iter(own))
    if num_input_channels != pretrained.num_input_channels:
        raise AutosegError(
            f"the pretrained network takes {pretrained.num_input_channels} input channel(s), this one "
            f"{num_input_channels}: first conv {first} has shape {_shape(pretrained.state.get(first))} there and "
            f"{_shape(own[first])} here", where=where)
    heads = num_classes == pretrained.num_classes
    skip = (lambda key: False) if heads else (lambda key: key.startswith(HEADS_PREFIX))
    for key, value in own.items():
        if skip(key):
            continue
        theirs = pretrained.state.get(key)
        if theirs is None:
            raise AutosegError(f"layer {key} (shape {_shape(value)}) is not in the pretrained network "
                               f"({pretrained.dataset} {pretrained.config_name}); {PLAN_HINT}", where=where)
        if tuple(theirs.shape) != tuple(value.shape):
            raise AutosegError(f"layer {key} has shape {_shape(theirs)} in the pretrained network "
                               f"({pretrained.dataset} {pretrained.config_name}) and {_shape(value)} here; "
                               f"{PLAN_HINT}", where=where)
    unused = [k for k in pretrained.state if k not in own and not skip(k)]
    if unused:
        raise AutosegError(f"pretrained layer {unused[0]} (shape {_shape(pretrained.state[unused[0]])}) has no "
                           f"counterpart in this network; {PLAN_HINT}", where=where)
    copied = {k: v for k, v in pretrained.state.items() if k in own and not skip(k)}
    with torch.no_grad():
        net.load_state_dict({**own, **copied})
    record = {"path": str(pretrained.path), "dataset": pretrained.dataset, "config": pretrained.config_name,
              "fold": pretrained.fold, "epoch": pretrained.epoch, "tensors_copied": len(copied),
              "heads": "copied" if heads else f"fresh ({pretrained.num_classes} -> {num_classes} classes)"}
    log.info("weights from %s (%s %s fold %s, epoch %d): %d tensors copied, segmentation heads %s",
             pretrained.path, pretrained.dataset, pretrained.config_name, pretrained.fold, pretrained.epoch,
             len(copied), record["heads"])
    return record


def _shape(t: torch.Tensor | None) -> str:
    return "(absent)" if t is None else "(" + ", ".join(str(int(s)) for s in t.shape) + ")"
