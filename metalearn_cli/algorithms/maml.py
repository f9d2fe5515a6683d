"""MAML (Finn, Abbeel, Levine 2017) and its first-order approximation.

For each task i of a meta-batch, the inner loop takes `inner_steps` SGD steps from the shared
initialization theta on the task's support set,

    theta_i^0 = theta,   theta_i^(k+1) = theta_i^k - inner_lr * grad L_support_i(theta_i^k),

and the meta-objective is the mean query loss of the adapted parameters,
J(theta) = mean_i L_query_i(theta_i^K). Its gradient is exact (second order: it flows back
through every inner gradient) unless `first_order` is set, in which case the inner gradients
are treated as constants and dJ/dtheta = mean_i grad L_query_i(theta_i^K) (FO-MAML).
With `first_order_steps=N`, the first N meta-iterations of a run are first order and every later
one exact (MAML++'s derivative-order annealing, Antoniou et al. 2019): a first-order iteration
costs less than half a second-order one on a CPU, and the end of training is exact MAML. On
Omniglot 5-shot the warm-up lost more accuracy than its time saving bought (BENCHMARKS.md, note 5).

The meta-optimizer (`outer_optimizer`) is Adam with learning rate `outer_lr`, constant as in the
paper, or, with `outer_lr_schedule="cosine"`, annealed along a half cosine from `outer_lr` to
`outer_lr_final` over the run's `trainer.max_steps` meta-iterations (as MAML++, Antoniou et al. 2019,
does): a run with a budget far below the paper's 60,000 iterations still ends at a small step size.
With `outer_optimizer="trpo"` (the paper's reinforcement-learning experiments) each meta-iteration is
one trust-region step (`metalearn_cli.algorithms.trpo`): the meta-objective's gradient, conjugate
gradient on Fisher-vector products of the mean query KL (`Tasks.query_kl`) through the inner loop,
the step scaled to the KL limit `max_kl` and a backtracking line search that accepts it only if the
query loss falls and the KL stays within the limit. The step is returned as a direction and applied
exactly (plain SGD with learning rate 1); `outer_lr` and its schedule do not apply.

`inner_params` chooses which parameters the inner loop adapts, in meta-training and evaluation
alike: `all` (the paper's description), `no_bn` (what the reference code adapts: batch norm's
scale and shift are meta-learned but the same in every task) or `head` (ANIL, Raghu et al. 2020:
only the final linear layer). Parameters left out keep theta's value in every task and get the
exact meta-gradient through the adapted ones.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from metalearn_cli import options
from metalearn_cli.algorithms.base import Algorithm, MetaStep, adapt, annealed
from metalearn_cli.algorithms.learned_rates import LearnsInnerRates
from metalearn_cli.algorithms.trpo import OUTER_OPTIMIZERS, TrustRegion
from metalearn_cli.functional import INNER_PARAMS, FunctionalModel, TaskModel
from metalearn_cli.tasks.base import Params, Tasks

#: algo.outer_lr_schedule: the meta learning rate over the run
OUTER_LR_SCHEDULES = ("constant", "cosine")


class MAML(Algorithm):
    name = "maml"

    def __init__(
        self,
        *args,
        first_order: bool = False,
        first_order_steps: int = 0,
        outer_lr_schedule: str = "constant",
        outer_lr_final: float = 0.0,
        inner_params: str = "all",
        outer_optimizer: str = "adam",
        max_kl: float = 0.01,
        trpo_damping: float = 1e-5,
        trpo_cg_iters: int = 10,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.inner_params = options.choice("inner_params", inner_params, INNER_PARAMS)
        self.outer_lr_schedule = options.choice("outer_lr_schedule", outer_lr_schedule, OUTER_LR_SCHEDULES)
        self.outer_lr_final = options.number("outer_lr_final", outer_lr_final,
                                             "the meta learning rate at the end of the schedule", strict=False)
        self.first_order_steps = options.integer("first_order_steps", first_order_steps,
                                                 "first-order meta-iterations at the start of the run", minimum=0)
        self.first_order = bool(first_order)
        self.outer_optimizer = options.choice("outer_optimizer", outer_optimizer, OUTER_OPTIMIZERS)
        self.trust_region = TrustRegion(max_kl, trpo_damping, trpo_cg_iters)
        if self.outer_optimizer == "trpo":
            self._check_trpo()

    def _check_trpo(self) -> None:
        """TRPO sets its own step size and moves only the model's weights."""
        if self.outer_lr_schedule != "constant":
            raise options.OptionError(
                f"`{{p}}outer_lr_schedule={self.outer_lr_schedule}` anneals Adam's learning rate, but "
                "`{p}outer_optimizer=trpo` has none: its step size is set by the KL limit `{p}max_kl`. "
                "Allowed with trpo: {p}outer_lr_schedule=constant (outer_lr is then unused)."
            )
        if isinstance(self, LearnsInnerRates):  # Meta-SGD, MAML++
            raise options.OptionError(
                f"`{{p}}outer_optimizer=trpo` is not available for algo={self.name}: its learned inner "
                "learning rates are trained beside the weights, and the trust-region step moves the weights "
                "only. Allowed: {p}outer_optimizer=adam, or algo=maml / fomaml / anil with trpo."
            )

    def inner_keys(self, fmodel: FunctionalModel) -> list[str] | None:
        return None if self.inner_params == "all" else fmodel.inner_keys(self.inner_params)

    def eval_protocol(self) -> dict:
        return {**super().eval_protocol(), "inner_params": self.inner_params}

    def configure_optimizers(self, parameters: Iterable[nn.Parameter], max_steps: int) -> dict:
        if self.outer_optimizer == "trpo":
            return self.trust_region.configure_optimizers(parameters)
        optimizer = torch.optim.Adam(parameters, lr=self.outer_lr)
        if self.outer_lr_schedule == "constant":
            return {"optimizer": optimizer}
        return annealed(optimizer, self.outer_lr_final / self.outer_lr, max_steps, "cosine")

    def is_first_order(self, iteration: int) -> bool:
        """Whether meta-iteration `iteration` (0-based) drops the second-order term."""
        return self.first_order or iteration < self.first_order_steps

    def meta_step(self, fmodel: FunctionalModel, tasks: Tasks, iteration: int = 0) -> MetaStep:
        if self.outer_optimizer == "trpo":
            return self.trpo_meta_step(fmodel, tasks, iteration)
        theta = fmodel.params()
        first_order = self.is_first_order(iteration)
        loss, (metrics,) = self.execution.mean_loss(
            lambda model, part: self.query_scores(model, theta, part, first_order, iteration), fmodel, tasks)
        return MetaStep(loss=loss, metrics={"loss": loss.detach(), tasks.objective.metric_name: metrics.mean()})

    def query_scores(self, model: TaskModel, theta: Params, tasks: Tasks, first_order: bool, iteration: int) -> tuple[Tensor, Tensor]:
        """[T] query losses after the inner loop (the meta-objective) and [T] query metrics."""
        adapted, _ = adapt(model, theta, tasks, self.inner_steps, self.inner_update(), self.inner_keys(model.fmodel),
                           differentiable=True, first_order=first_order)
        return tasks.query_scores(model, adapted, self.inner_steps)

    def trpo_meta_step(self, fmodel: FunctionalModel, tasks: Tasks, iteration: int = 0) -> MetaStep:
        """One TRPO step on the mean query loss after adaptation (`metalearn_cli.algorithms.trpo`), as the
        direction theta - theta_new; the line search adapts each candidate again."""
        first_order = self.is_first_order(iteration)
        keys, steps = self.inner_keys(fmodel), self.inner_steps

        def adapted(model: TaskModel, theta: Params, part: Tasks, differentiable: bool) -> Params:
            return adapt(model, theta, part, steps, self.inner_update(), keys, differentiable=differentiable,
                         first_order=first_order)[0]

        return self.trust_region.meta_step(self.execution, fmodel, tasks, adapted, steps)
