"""Meta-SGD (Li, Zhou, Chen, Li 2017): MAML whose inner step size is learned, one entry per
parameter entry,

    theta_i' = theta - alpha * grad L_support_i(theta)      (alpha has theta's shape, * elementwise),

with alpha initialised to `inner_lr` and meta-learned together with theta by the same outer Adam
(the meta-gradient reaches alpha through the update). The learned alpha is saved in checkpoints and
used by evaluation's adaptation. Everything else (exact or first-order meta-gradient, inner steps,
meta-rate schedule) is MAML's.
"""

from __future__ import annotations

from metalearn_cli.algorithms.learned_rates import LearnsInnerRates
from metalearn_cli.algorithms.maml import MAML


class MetaSGD(LearnsInnerRates, MAML):
    name = "metasgd"

    def rate_shape(self, parameter):
        return parameter.shape  # one rate per parameter entry

    def eval_protocol(self) -> dict:
        return {**super().eval_protocol(), "eval_inner_lr": "learned (per parameter entry)"}
