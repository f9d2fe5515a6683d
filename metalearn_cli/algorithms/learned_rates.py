"""Inner-loop learning rates that are meta-learned with the weights (Meta-SGD, MAML++'s LSLR)."""

from __future__ import annotations

import torch
from torch import nn

from metalearn_cli.algorithms.inner_optim import LearnedSGD


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


class LearnsInnerRates:
    """For an algorithm with an inner loop (a MAML subclass): its inner update is `LearnedSGD` over
    rates of `rate_shape(parameter)`, initialised to `inner_lr`, learned in meta-training (the
    `inner_rates` extra module) and used detached by evaluation."""

    #: whether the rates are indexed by inner step (then `rate_shape` gives [steps])
    per_step = False
    rates: LearnedRates | None = None

    def rate_shape(self, parameter: torch.Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def extra_modules(self, model: nn.Module, source, sampler) -> dict[str, nn.Module]:
        self.rates = LearnedRates(model, self.inner_lr, self.rate_shape)
        return {"inner_rates": self.rates}

    def _rates(self) -> dict[str, torch.Tensor]:
        if self.rates is None:
            raise RuntimeError(f"{type(self).__name__} needs its learned rates: call extra_modules(model, ...) first")
        return self.rates.by_name()

    def inner_update(self) -> LearnedSGD:
        return LearnedSGD(self._rates(), per_step=self.per_step)

    def eval_optimizer(self) -> LearnedSGD:
        return LearnedSGD({k: v.detach() for k, v in self._rates().items()}, per_step=self.per_step)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not hold dots
