"""Fine-tuning weights (`autoseg.train.pretrained`): what is copied, what stays fresh, what is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.common.errors import AutosegError
from autoseg.nets.unet import build_unet
from autoseg.train.checkpoint import Checkpoint, RngState, load_checkpoint, save_checkpoint
from autoseg.train.config import TrainerConfig, apply_overrides
from autoseg.train.pretrained import load_pretrained, transfer_weights
from tests.train.conftest import tiny_plan


def save_source(path: Path, in_channels: int = 1, num_classes: int = 3, seed: int = 1,
                features: tuple[int, ...] = (4, 8, 16)) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint of a tiny network with its own random weights (the "pretrained" run)."""
    plan = tiny_plan()
    config = dataclasses.replace(plan.configurations["3d_fullres"], features_per_stage=features)
    torch.manual_seed(seed)
    net = build_unet(config, in_channels, num_classes)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    save_checkpoint(path, Checkpoint(
        model_state=state, optimizer_state={}, scaler_state={}, epoch=2, best_ema_pseudo_dice=None, history=[],
        rng=RngState(torch.get_rng_state(), [], np.random.default_rng(0).bit_generator.state),
        trainer_config=TrainerConfig(), plan=plan, config_name="3d_fullres", dataset="Dataset999_Phantom",
        fold=0, num_input_channels=in_channels, num_classes=num_classes))
    return path, state


def fresh_net(num_classes: int = 3, in_channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(7)
    return build_unet(tiny_plan().configurations["3d_fullres"], in_channels, num_classes)


def test_same_classes_copies_every_tensor(tmp_path) -> None:
    path, source = save_source(tmp_path / "src.pt")
    net = fresh_net()
    record = transfer_weights(net, load_pretrained(path), 1, 3)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.items())
    assert record["heads"] == "copied" and record["tensors_copied"] == len(source)
    assert (record["dataset"], record["epoch"], record["path"]) == ("Dataset999_Phantom", 2, str(path.resolve()))


def test_other_class_count_keeps_fresh_heads(tmp_path) -> None:
    path, source = save_source(tmp_path / "src.pt", num_classes=3)
    net = fresh_net(num_classes=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    record = transfer_weights(net, load_pretrained(path), 1, 2)
    after = net.state_dict()
    heads = [k for k in after if k.startswith("heads.")]
    assert len(heads) == 2 * len(net.heads) >= 4  # weight + bias of every deep-supervision head
    assert all(torch.equal(after[k], before[k]) for k in heads)
    assert all(torch.equal(after[k], source[k]) for k in after if k not in heads)
    assert record["heads"] == "fresh (3 -> 2 classes)" and record["tensors_copied"] == len(after) - len(heads)


def test_other_topology_names_the_first_mismatching_layer(tmp_path) -> None:
    path, _ = save_source(tmp_path / "src.pt", features=(4, 8, 32))
    net = fresh_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(AutosegError) as err:
        transfer_weights(net, load_pretrained(path), 1, 3)
    text = str(err.value)
    assert "layer encoder.2.0.weight has shape (32, 8, 3, 3, 3)" in text and "(16, 8, 3, 3, 3) here" in text
    assert "--from-plans" in text and str(path.resolve()) in text and "\n" not in text
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())  # refused: nothing changed


def test_other_input_channel_count_names_the_first_conv(tmp_path) -> None:
    path, _ = save_source(tmp_path / "src.pt", in_channels=2)
    with pytest.raises(AutosegError, match=r"takes 2 input channel\(s\), this one 1: first conv "
                                           r"encoder\.0\.0\.weight has shape \(4, 2, 3, 3, 3\) there and "
                                           r"\(4, 1, 3, 3, 3\) here"):
        transfer_weights(fresh_net(), load_pretrained(path), 1, 3)


def test_unreadable_or_missing_source_is_one_line(tmp_path) -> None:
    with pytest.raises(AutosegError, match="checkpoint not found; --pretrained needs"):
        load_pretrained(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AutosegError, match="bad.pt: cannot load checkpoint") as err:
        load_pretrained(bad)
    assert "\n" not in str(err.value)


def test_checkpoint_records_the_source_and_old_files_read_none(tmp_path) -> None:
    path, _ = save_source(tmp_path / "src.pt")
    ckpt = load_checkpoint(path)
    assert ckpt.pretrained_from is None  # trained from scratch
    record = {"path": "/x/checkpoint_final.pt", "dataset": "Dataset999_Phantom", "heads": "copied"}
    back = load_checkpoint(save_checkpoint(tmp_path / "ft.pt", dataclasses.replace(ckpt, pretrained_from=record)))
    assert back.pretrained_from == record
    raw = torch.load(path, weights_only=True)
    del raw["pretrained_from_json"]  # a checkpoint written before fine-tuning existed
    torch.save(raw, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").pretrained_from is None


def test_pretrained_is_a_trainer_key() -> None:
    cfg = apply_overrides(TrainerConfig(), ["pretrained=/runs/checkpoint_final.pt"])
    assert cfg.pretrained == "/runs/checkpoint_final.pt" and cfg.flat_dict()["pretrained"] == cfg.pretrained
    assert apply_overrides(cfg, ["pretrained=none"]).pretrained is None
    assert json.loads(json.dumps(cfg.flat_dict()))["pretrained"] == "/runs/checkpoint_final.pt"
