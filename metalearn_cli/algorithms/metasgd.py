"""Meta-SGD (Li, Zhou, Chen, Li 2017): MAML whose inner step size is learned, one entry per
parameter entry,

    theta_i' = theta - alpha * grad L_support_i(theta)      (alpha has theta's shape, * elementwise),

with alpha initialised to `inner_lr` and meta-learned together with theta by the same outer Adam
(the meta-gradient reaches alpha through the update). The learned alpha is saved in checkpoints and
used by evaluation's adaptation. Everything else (exact or first-order meta-gradient, inner steps,
meta-rate schedule) is MAML's.
"""

from __future__ import annotations

from torch import nn

from metalearn_cli.algorithms.inner_optim import LearnedSGD
from metalearn_cli.algorithms.learned_rates import LearnedRates
from metalearn_cli.algorithms.maml import MAML


class MetaSGD(MAML):
    name = "metasgd"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rates: LearnedRates | None = None

    def extra_modules(self, model: nn.Module, source, sampler) -> dict[str, nn.Module]:
        self.rates = LearnedRates(model, self.inner_lr, lambda p: p.shape)
        return {"inner_rates": self.rates}

    def _rates(self) -> LearnedRates:
        if self.rates is None:
            raise RuntimeError("MetaSGD needs its learned rates: call extra_modules(model, ...) first")
        return self.rates

    def inner_update(self):
        return LearnedSGD(self._rates().by_name())

    def eval_optimizer(self):
        return LearnedSGD({k: v.detach() for k, v in self._rates().by_name().items()})

    def eval_protocol(self) -> dict:
        return {**super().eval_protocol(), "eval_inner_lr": "learned (per parameter entry)"}
