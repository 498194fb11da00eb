"""DDP with 2 CPU processes (gloo): ranks see different data yet end with identical weights."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from autoseg.common.errors import AutosegError
from autoseg.train.config import TrainerConfig
from autoseg.train.ddp import DistContext, init_distributed, shutdown_distributed, split_batch
from autoseg.train.loop import fit
from tests.train.conftest import cpu_runtime, make_setup

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, tmp: str, port: int) -> None:
    torch.set_num_threads(1)
    ctx = DistContext(rank=rank, world_size=WORLD, local_rank=rank)
    init_distributed(ctx, "cpu", init_method=f"tcp://127.0.0.1:{port}")
    clean = False
    try:
        cfg = TrainerConfig(epochs=1, iterations_per_epoch=2, val_iterations=1, seed=0)
        setup = make_setup(Path(tmp) / "fold", cfg, seed=100 + rank, batch_size=split_batch(2, ctx),
                           distributed=True)
        fit(setup, cpu_runtime(ctx))
        torch.save(setup.net.state_dict(), Path(tmp) / f"rank{rank}.pt")
        clean = True
    finally:
        shutdown_distributed(ctx, clean=clean)


def test_two_ranks_end_with_identical_weights(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    initial = make_setup(tmp_path / "init", TrainerConfig(seed=0)).net.state_dict()
    changed = 0
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
        changed += not torch.equal(value, initial[key])
    assert changed > 0  # they trained, and stayed in sync
    assert (tmp_path / "fold" / "checkpoint_final.pt").is_file()  # written by rank 0 only
    assert len((tmp_path / "fold" / "training_log.jsonl").read_text(encoding="utf-8").splitlines()) == 1


def test_split_batch() -> None:
    assert [split_batch(5, DistContext(r, 2, r)) for r in range(2)] == [3, 2]
    with pytest.raises(AutosegError, match="batch size 1"):
        split_batch(1, DistContext(0, 2, 0))
