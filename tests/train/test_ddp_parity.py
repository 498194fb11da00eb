"""DDP like nnU-Net: the global batch keeps its forced-foreground share, batch Dice is the global batch's.

The split rule is checked for world sizes 1-4 against the single-process count and nnunetv2's
``nnUNetTrainer._set_batch_size_and_oversample`` (skipped without nnunetv2); the loss with
2 gloo processes on the CPU against one process on the concatenated batch.
"""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from autoseg.data.sampling import is_forced_foreground
from autoseg.train.ddp import (
    DistContext,
    all_reduce_sum,
    init_distributed,
    shutdown_distributed,
    split_batch,
    split_oversample,
    wrap_model,
)
from autoseg.train.losses import build_loss

FRACTIONS = (0.0, 0.2, 0.33, 0.5, 0.66, 1.0)
WORLD = 2
NUM_CLASSES = 3


def _forced(batch: int, oversample: float) -> int:
    """Forced-foreground samples of one loader batch (the rule `autoseg.data.loader` applies)."""
    return sum(is_forced_foreground(i, batch, oversample) for i in range(batch))


def _ranks(world: int) -> list[DistContext]:
    return [DistContext(r, world, r) for r in range(world)]


@pytest.mark.parametrize("oversample", FRACTIONS)
def test_ranks_together_force_what_one_process_forces(oversample: float) -> None:
    for world in range(1, 5):
        for global_batch in range(world, 13):
            ctxs = _ranks(world)
            together = sum(_forced(split_batch(global_batch, c), split_oversample(global_batch, oversample, c))
                           for c in ctxs)
            assert together == _forced(global_batch, oversample), (world, global_batch)


def test_two_ranks_batch_two_have_one_forced_sample() -> None:
    # the bug: each rank ran round(1 * (1 - 0.33)) = 1 -> its only sample random, none forced
    ctxs = _ranks(2)
    assert [_forced(1, 0.33) for _ in ctxs] == [0, 0]
    assert [_forced(1, split_oversample(2, 0.33, c)) for c in ctxs] == [0, 1]


def test_split_matches_nnunet() -> None:
    pytest.importorskip("nnunetv2", reason="nnunetv2 (the parity reference) is not installed; see README")
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    def nnunet(global_batch: int, oversample: float, ctx: DistContext) -> tuple[int, float]:
        trainer = SimpleNamespace(is_ddp=ctx.enabled, configuration_manager=SimpleNamespace(batch_size=global_batch),
                                  oversample_foreground_percent=oversample)
        fake_dist = SimpleNamespace(get_world_size=lambda: ctx.world_size, get_rank=lambda: ctx.rank)
        with pytest.MonkeyPatch.context() as mp_, contextlib.redirect_stdout(io.StringIO()):
            mp_.setattr(module, "dist", fake_dist)
            module.nnUNetTrainer._set_batch_size_and_oversample(trainer)
        return trainer.batch_size, trainer.oversample_foreground_percent

    for oversample in FRACTIONS:
        for world in range(1, 5):
            for global_batch in range(world, 13):
                for ctx in _ranks(world):
                    ours = (split_batch(global_batch, ctx), split_oversample(global_batch, oversample, ctx))
                    assert ours == pytest.approx(nnunet(global_batch, oversample, ctx)), (oversample, ctx, global_batch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same images and labels in every process: (B, 1, 6, 6, 6) each, 3 classes."""
    g = torch.Generator().manual_seed(global_batch)
    x = torch.randn(global_batch, 1, 6, 6, 6, generator=g)
    target = torch.randint(0, NUM_CLASSES, (global_batch, 1, 6, 6, 6), generator=g)
    return x, target


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv3d(1, NUM_CLASSES, 3, padding=1)


CASES = (("dice", 3), ("dice_ce", 4))
"""(loss, global batch): Dice alone also with unequal local batches (2 + 1); CE averages per rank, so even only."""


def _loss_and_grads(net: nn.Module, name: str, x: torch.Tensor, target: torch.Tensor,
                    distributed: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad()
    loss = build_loss(name, True, 1, distributed=distributed)(net(x), target)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


def _worker(rank: int, tmp: str, port: int) -> None:
    torch.set_num_threads(1)
    ctx = DistContext(rank=rank, world_size=WORLD, local_rank=rank)
    init_distributed(ctx, "cpu", init_method=f"tcp://127.0.0.1:{port}")
    clean = False
    try:
        out = {}
        for name, global_batch in CASES:
            x, target = _data(global_batch)
            start = sum(split_batch(global_batch, DistContext(r, WORLD, r)) for r in range(rank))
            local = slice(start, start + split_batch(global_batch, ctx))
            net = _net()
            model = wrap_model(net, ctx, torch.device("cpu"))
            loss, grads = _loss_and_grads(model, name, x[local], target[local], distributed=True)
            # DDP averaged the gradients; the loop logs the mean loss over ranks
            out[name] = (all_reduce_sum(loss.reshape(1), ctx) / WORLD, grads)
        forced = _forced(split_batch(2, ctx), split_oversample(2, 0.33, ctx))
        out["forced"] = all_reduce_sum(torch.tensor([forced]), ctx)
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
        clean = True
    finally:
        shutdown_distributed(ctx, clean=clean)


def test_ddp_batch_dice_is_the_global_batch_dice(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, global_batch in CASES:
        x, target = _data(global_batch)
        loss, grads = _loss_and_grads(_net(), name, x, target, distributed=False)
        for res in results:
            ddp_loss, ddp_grads = res[name]
            torch.testing.assert_close(ddp_loss, loss.reshape(1), rtol=1e-5, atol=1e-6, msg=name)
            for a, b in zip(ddp_grads, grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert [int(res["forced"]) for res in results] == [1, 1]  # a global batch of 2 on 2 ranks: one forced sample
