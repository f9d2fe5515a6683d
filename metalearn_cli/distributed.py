"""Data-parallel meta-training: R processes each take a contiguous part of the same meta-batch of
B tasks (B // R or B // R + 1 tasks; the first B % R ranks take one more) and their meta-gradients
are combined weighted by the parts' sizes, sum_r n_r g_r / B: since each rank's loss is a mean over
its own n_r tasks, that is the mean over all B tasks, and R ranks follow the same math as one process.

`MetaDDPStrategy` is Lightning's DDP (process launch, process groups, samplers, checkpoint I/O)
without the DistributedDataParallel wrapper: DDP's reducer assumes one forward and one backward
per step, which neither second-order MAML (gradients through torch.func.grad) nor Reptile (no
backward at all) has. The gradient (or Reptile's update direction) is combined explicitly with
one all-reduce per step instead.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from torch import nn


class MetaDDPStrategy(DDPStrategy):
    strategy_name = "meta_ddp"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        return model  # no DistributedDataParallel wrapper: see the module docstring


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def weighted_flat(tensors: list[torch.Tensor], weight: float) -> torch.Tensor:
    """One flat buffer: every tensor times `weight`, then `weight` itself. Summed over ranks, it holds
    sum_r w_r t_r and sum_r w_r (see `set_weighted_mean_`)."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors] + [torch.ones(1, dtype=tensors[0].dtype, device=tensors[0].device)])
    return flat.mul_(weight)


def set_weighted_mean_(tensors: list[torch.Tensor], summed: torch.Tensor) -> None:
    """Set each tensor to its part of sum_r w_r t_r / sum_r w_r, from the sum of the ranks' `weighted_flat`s."""
    means = summed[:-1] / summed[-1]
    offset = 0
    for t in tensors:
        t.copy_(means[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_weighted_mean_(tensors: Iterable[torch.Tensor | None], weight: float) -> None:
    """Replace each tensor by its mean over all ranks weighted by each rank's `weight`,
    sum_r w_r t_r / sum_r w_r, in place, with one all-reduce of a flat buffer (the weights travel in it)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors or not is_distributed():
        return
    flat = weighted_flat(tensors, weight)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    set_weighted_mean_(tensors, flat)


def weighted_mean_over_ranks(value: torch.Tensor, weight: float) -> torch.Tensor:
    """A copy of `value` averaged over the ranks, each weighted by `weight` (see `all_reduce_weighted_mean_`);
    `value` itself in one process. A trust-region step's reduction (`TrustRegion.reduce`): ranks that
    hold parts of a meta-batch combine their parts' means into the whole batch's."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    all_reduce_weighted_mean_([out], weight)
    return out


def all_reduce_advance_(counters: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    """Counters that every rank advanced from the same `before` by counting its own part of the work
    (Reptile's carried Adam step count): each becomes `before` plus the sum of the ranks' advances."""
    if not counters or not is_distributed():
        return
    advances = torch.cat([(c - b).reshape(-1) for c, b in zip(counters, before)])
    dist.all_reduce(advances, op=dist.ReduceOp.SUM)
    offset = 0
    for c, b in zip(counters, before):
        c.copy_(b + advances[offset : offset + c.numel()].view_as(c))
        offset += c.numel()


def gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor (any number of rows), in rank order."""
    if not is_distributed():
        return [rows]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows.cpu())
    return gathered
