"""Data-parallel meta-training: R processes each take B/R tasks of the same meta-batch and the
meta-gradient is averaged, so R ranks with meta-batch B follow the same math as one process.

`MetaDDPStrategy` is Lightning's DDP (process launch, process groups, samplers, checkpoint I/O)
without the DistributedDataParallel wrapper: DDP's reducer assumes one forward and one backward
per step, which neither second-order MAML (gradients through torch.func.grad) nor Reptile (no
backward at all) has. The gradient (or Reptile's update direction) is averaged explicitly with
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


def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average tensors over all ranks in place, with one all-reduce of a flat buffer."""
    tensors = [t for t in tensors if t is not None]
    if not tensors or not is_distributed():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor (any number of rows), in rank order."""
    if not is_distributed():
        return [rows]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows.cpu())
    return gathered
