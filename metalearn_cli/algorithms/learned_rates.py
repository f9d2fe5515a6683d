"""Inner-loop learning rates that are meta-learned with the weights (Meta-SGD, MAML++'s LSLR)."""

from __future__ import annotations

import torch
from torch import nn


class LearnedRates(nn.Module):
    """One learnable rate tensor per model parameter, each of `shape(parameter)` (a shape function),
    initialised to `value`. Parameters of their own, so the outer optimizer learns them and
    checkpoints save them."""

    def __init__(self, model: nn.Module, value: float, shape) -> None:
        super().__init__()
        self.names = [name for name, _ in model.named_parameters()]
        self.rates = nn.ParameterDict({
            _key(name): nn.Parameter(torch.full(shape(p), float(value), dtype=p.dtype, device=p.device))
            for name, p in model.named_parameters()
        })

    def by_name(self) -> dict[str, torch.Tensor]:
        return {name: self.rates[_key(name)] for name in self.names}


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not hold dots
