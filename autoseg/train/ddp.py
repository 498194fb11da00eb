"""Distributed data parallel (``torchrun``) support: one model trained on several devices.

The rank, world size and local rank are read from the environment by the CLI (torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and passed here explicitly as a `DistContext`.
The global batch is split over ranks together with its foreground-oversampled samples
(`split_oversample`), batch Dice sums its TP/FP/FN over all ranks (`all_reduce_sum_grad`),
each rank seeds its loaders with ``seed + rank``, and only rank 0 writes logs and
checkpoints. gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from autoseg.common.errors import AutosegError
from autoseg.data.sampling import is_forced_foreground

log = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)
"""Generous: rank 0 runs the (slow) final validation while the others wait at the last barrier."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a distributed run; world_size 1 means not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise AutosegError(f"bad distributed setup: rank {self.rank}, world size {self.world_size}, "
                               f"local rank {self.local_rank}", where="RANK/WORLD_SIZE/LOCAL_RANK")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and shows progress."""
        return self.rank == 0


def split_batch(global_batch_size: int, ctx: DistContext) -> int:
    """This rank's share of the global batch (the first ``global % world`` ranks take one more)."""
    if global_batch_size < ctx.world_size:
        raise AutosegError(f"batch size {global_batch_size} is smaller than the number of processes "
                           f"({ctx.world_size}); raise it with --set batch_size=N", where="batch_size")
    base, extra = divmod(global_batch_size, ctx.world_size)
    return base + (1 if ctx.rank < extra else 0)


def split_oversample(global_batch_size: int, oversample: float, ctx: DistContext) -> float:
    """This rank's foreground-oversampling fraction, so that the global batch keeps its forced samples.

    Each rank applies the forced-foreground rule to its local batch; with the global fraction
    a global batch of 2 on 2 ranks (round(1 * 0.67) = 1 random sample each) had no forced sample
    at all. Instead rank r takes the samples r holds of the global batch (`split_batch` order)
    and forces exactly those the single-process rule forces there (nnU-Net's
    ``_set_batch_size_and_oversample``): with c of its b samples forced, the fraction c / b
    makes the local rule force its last c.
    """
    if not ctx.enabled:
        return oversample
    local = split_batch(global_batch_size, ctx)
    start = sum(split_batch(global_batch_size, DistContext(r, ctx.world_size, r)) for r in range(ctx.rank))
    forced = sum(is_forced_foreground(i, global_batch_size, oversample) for i in range(start, start + local))
    return forced / local


def device_for(ctx: DistContext, device_type: str) -> torch.device:
    """The device of this rank: ``cuda:<local_rank>`` on GPUs, the CPU otherwise."""
    if device_type == "cuda":
        return torch.device("cuda", ctx.local_rank if ctx.enabled else torch.cuda.current_device())
    return torch.device(device_type)


def init_distributed(ctx: DistContext, device_type: str, init_method: str = "env://") -> None:
    """Join the process group (nccl on CUDA, gloo on CPU); a no-op for a single process.

    ``init_method="env://"`` uses MASTER_ADDR/MASTER_PORT as torchrun sets them; tests pass a
    ``file://`` or ``tcp://`` address instead.
    """
    if not ctx.enabled or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend=backend, init_method=init_method, rank=ctx.rank,
                            world_size=ctx.world_size, timeout=PROCESS_GROUP_TIMEOUT)
    log.info("joined process group: rank %d of %d (%s)", ctx.rank, ctx.world_size, backend)


def shutdown_distributed(ctx: DistContext, clean: bool = True) -> None:
    """Leave the process group, if this process joined one.

    On a clean exit every rank first meets at a barrier: a rank that tears down its gloo
    connections while a peer still uses them can make that peer abort (``std::terminate``).
    After an error the barrier is skipped, since the other ranks may never arrive.
    """
    if not (ctx.enabled and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """Wrap in DistributedDataParallel when distributed (gradients all-reduced in backward)."""
    if not ctx.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks (validation TP/FP/FN, losses, the stop flag); identity when alone."""
    if ctx.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class _AllReduceSumGrad(torch.autograd.Function):
    """Sum over ranks that gradients flow through: the backward sums the incoming gradients too.

    Every rank computes the same loss from the summed tensor, so rank r's input gets
    ``world_size`` times its own share of the gradient here; DDP's averaging of the parameter
    gradients then gives exactly the gradient of that loss on the whole global batch.
    """

    @staticmethod
    def forward(ctx: object, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_grad(values: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks of the default process group, differentiably (batch Dice's TP/FP/FN);
    identity without one, e.g. a loss built for DDP used in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    return _AllReduceSumGrad.apply(values)


def all_ranks_ok(ok: bool, ctx: DistContext) -> bool:
    """True only if every rank says ok (so one rank's refusal stops all instead of hanging them)."""
    if not ctx.enabled:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    return bool(all_reduce_sum(flag, ctx).item() == 0)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (e.g. before rank 0 reads what all ranks trained)."""
    if ctx.enabled:
        dist.barrier()
