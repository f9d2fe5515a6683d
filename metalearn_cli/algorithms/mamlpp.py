"""MAML++ (Antoniou, Edwards, Storkey 2019, "How to train your MAML"): MAML with

* LSLR, learned per-layer per-step inner learning rates: one scalar per parameter tensor and inner
  step, initialised to `inner_lr` and meta-learned with the weights (evaluation steps beyond the
  trained ones reuse the last step's rate);
* the multi-step loss (MSL): the meta-objective is sum_k w_k * L_query(theta^k) over the inner steps
  k = 1..K, with w uniform (1/K) at the start and annealed towards the last step over `msl_steps`
  meta-iterations: the other steps' weights fall linearly to `0.03 / K` and the last step takes the
  rest, as the authors' code (HowToTrainYourMAMLPytorch) does;
* and what MAML here already has, which `configs/algo/mamlpp.yaml` turns on: derivative-order
  annealing (`first_order_steps`), the cosine meta-rate (`outer_lr_schedule: cosine`), and, on image
  data, per-step batch-norm statistics (`model.bn=per_step`, set by `configs/tuning/mamlpp_*.yaml`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from metalearn_cli import options
from metalearn_cli.algorithms.base import adapt
from metalearn_cli.algorithms.learned_rates import LearnsInnerRates
from metalearn_cli.algorithms.maml import MAML
from metalearn_cli.functional import TaskModel
from metalearn_cli.tasks.base import Params, Tasks

#: the smallest weight MSL leaves on a step other than the last, times the number of steps
MSL_FLOOR = 0.03


def msl_weights(steps: int, iteration: int, msl_steps: int) -> Tensor:
    """[steps] weights of the query losses after inner steps 1..steps at meta-iteration `iteration`."""
    if msl_steps <= 0 or steps == 1:
        weights = torch.zeros(steps, dtype=torch.float64)
        weights[-1] = 1.0
        return weights
    progress = min(iteration, msl_steps) / msl_steps
    floor = MSL_FLOOR / steps
    others = max(1.0 / steps - progress * (1.0 / steps - floor), floor)
    weights = torch.full((steps,), others, dtype=torch.float64)
    weights[-1] = 1.0 - (steps - 1) * others
    return weights


class MAMLpp(LearnsInnerRates, MAML):
    name = "mamlpp"
    per_step = True

    def __init__(self, *args, msl_steps: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.msl_steps = options.integer("msl_steps", msl_steps, "meta-iterations over which the multi-step loss anneals", minimum=0)

    def rate_shape(self, parameter):
        return (self.inner_steps,)  # one rate per layer (parameter tensor) and inner step

    def eval_protocol(self) -> dict:
        return {**super().eval_protocol(), "eval_inner_lr": "learned (per layer and step)"}

    def query_scores(self, model: TaskModel, theta: Params, tasks: Tasks, first_order: bool, iteration: int) -> tuple[Tensor, Tensor]:
        """The multi-step loss: the query loss after every inner step, weighted by `msl_weights`."""
        weights = msl_weights(self.inner_steps, iteration, self.msl_steps)
        losses: list[Tensor] = []

        def after_step(step: int, params: Params) -> None:
            if step < self.inner_steps and weights[step - 1] > 0:
                losses.append(weights[step - 1].item() * tasks.query_loss(model, params, step))

        adapted, _ = adapt(model, theta, tasks, self.inner_steps, self.inner_update(), self.inner_keys(model.fmodel),
                           differentiable=True, first_order=first_order, after_step=after_step)
        last, metric = tasks.query_scores(model, adapted, self.inner_steps)
        return sum(losses, weights[-1].item() * last), metric
