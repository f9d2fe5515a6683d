"""Networks. Plain `nn.Module`s: algorithms use them as pure functions of a parameter dict
through `torch.func.functional_call`, so nothing here knows about meta-learning."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected ReLU network; the MAML paper's sinusoid model is MLP((1,), 1, hidden=(40, 40))."""

    def __init__(self, input_shape: Sequence[int], out_features: int, hidden: Sequence[int] = (40, 40)) -> None:
        super().__init__()
        sizes = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
