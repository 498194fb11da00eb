"""Checkpoint round trip (weights_only), strict key checks, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoseg.common.errors import AutosegError
from autoseg.nets.unet import build_unet
from autoseg.train.checkpoint import Checkpoint, RngState, load_checkpoint, load_model_state, save_checkpoint
from autoseg.train.config import TrainerConfig
from tests.train.conftest import tiny_plan


def _checkpoint(net: torch.nn.Module) -> Checkpoint:
    plan = tiny_plan()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    net(torch.zeros(1, 1, 16, 16, 16))[0].sum().backward()
    opt.step()
    return Checkpoint(
        model_state=net.state_dict(), optimizer_state=opt.state_dict(), scaler_state={}, epoch=3,
        best_ema_pseudo_dice=0.5, history=[{"epoch": 0, "train_loss": 1.0, "pseudo_dice": [None, 0.2]}],
        rng=RngState(torch.get_rng_state(), [], np.random.default_rng(5).bit_generator.state),
        trainer_config=TrainerConfig(epochs=4), plan=plan, config_name="3d_fullres",
        dataset=plan.dataset, fold="all", num_input_channels=1, num_classes=3)


def test_round_trip_rebuilds_the_network(tmp_path) -> None:
    plan = tiny_plan()
    net = build_unet(plan.configurations["3d_fullres"], 1, 3)
    ckpt = _checkpoint(net)
    path = save_checkpoint(tmp_path / "checkpoint_latest.pt", ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pt"]  # no temp file left
    torch.load(path, weights_only=True)  # loadable without unpickling arbitrary objects
    back = load_checkpoint(path)
    assert (back.epoch, back.fold, back.best_ema_pseudo_dice, back.history) == (3, "all", 0.5, ckpt.history)
    assert back.trainer_config == ckpt.trainer_config and back.plan == plan
    assert back.rng.numpy == ckpt.rng.numpy and torch.equal(back.rng.torch_cpu, ckpt.rng.torch_cpu)
    rebuilt = build_unet(back.plan.configurations[back.config_name], back.num_input_channels, back.num_classes)
    load_model_state(rebuilt, back.model_state, where=path)
    for (k, a), b in zip(net.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k
    opt = torch.optim.SGD(rebuilt.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    opt.load_state_dict(back.optimizer_state)
    assert len(opt.state) == len(ckpt.optimizer_state["state"]) > 0  # momentum buffers came back


def test_strict_keys(tmp_path) -> None:
    net = build_unet(tiny_plan().configurations["3d_fullres"], 1, 3)
    state = net.state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("heads.0")}
    with pytest.raises(AutosegError, match="missing keys"):
        load_model_state(net, missing, where="x.pt")
    with pytest.raises(AutosegError, match="unused keys"):
        load_model_state(net, {**state, "extra.weight": torch.zeros(1)}, where="x.pt")
    other = build_unet(tiny_plan().configurations["3d_fullres"], 1, 4)  # 4 classes: head shapes differ
    with pytest.raises(AutosegError, match="do not fit"):
        load_model_state(other, state, where="x.pt")


def test_bad_files_are_user_errors(tmp_path) -> None:
    with pytest.raises(AutosegError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(AutosegError, match="not an autoseg checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    with pytest.raises(AutosegError, match="cannot load"):
        load_checkpoint(tmp_path / "broken.pt")
