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

The meta-optimizer is Adam with learning rate `outer_lr`, constant as in the paper, or, with
`outer_lr_schedule="cosine"`, annealed along a half cosine from `outer_lr` to `outer_lr_final` over
the run's `trainer.max_steps` meta-iterations (as MAML++, Antoniou et al. 2019, does): a run with a
budget far below the paper's 60,000 iterations still ends at a small step size.

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
from torch.func import grad

from metalearn_cli.algorithms.base import Algorithm, FunctionalModel, MetaStep, Params, annealed, over_task_slices, over_tasks
from metalearn_cli.batched import batched_forward, expand, supports
from metalearn_cli.config_checks import INNER_PARAMS, OUTER_LR_SCHEDULES
from metalearn_cli.tasks import TaskBatch


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
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if inner_params not in INNER_PARAMS:
            raise ValueError(f"unknown inner_params {inner_params!r}; allowed: {', '.join(INNER_PARAMS)}")
        if outer_lr_schedule not in OUTER_LR_SCHEDULES:
            raise ValueError(f"unknown outer_lr_schedule {outer_lr_schedule!r}; allowed: {', '.join(OUTER_LR_SCHEDULES)}")
        if int(first_order_steps) != first_order_steps or first_order_steps < 0:
            raise ValueError(f"first_order_steps must be an integer >= 0, got {first_order_steps!r}")
        self.first_order = bool(first_order)
        self.first_order_steps = int(first_order_steps)
        self.outer_lr_schedule = outer_lr_schedule
        self.outer_lr_final = float(outer_lr_final)
        self.inner_params = inner_params

    def inner_keys(self, fmodel: FunctionalModel) -> list[str] | None:
        return None if self.inner_params == "all" else fmodel.inner_keys(self.inner_params)

    def eval_protocol(self) -> dict:
        return {**super().eval_protocol(), "inner_params": self.inner_params}

    def configure_optimizers(self, parameters: Iterable[nn.Parameter], max_steps: int) -> dict:
        optimizer = torch.optim.Adam(parameters, lr=self.outer_lr)
        if self.outer_lr_schedule == "constant":
            return {"optimizer": optimizer}
        return annealed(optimizer, self.outer_lr_final / self.outer_lr, max_steps, "cosine")

    def is_first_order(self, iteration: int) -> bool:
        """Whether meta-iteration `iteration` (0-based) drops the second-order term."""
        return self.first_order or iteration < self.first_order_steps

    def adapt(self, fmodel: FunctionalModel, params: Params, x: Tensor, y: Tensor, steps: int, first_order: bool = False) -> Params:
        """The inner loop: `steps` SGD steps on (x, y), differentiable w.r.t. `params` (through the
        inner gradients too unless `first_order`). Only the parameters in `inner_keys` move."""
        keys = self.inner_keys(fmodel) or list(params)
        for step in range(steps):
            current = params
            grads = grad(lambda adapted: fmodel.loss({**current, **adapted}, x, y, step))({k: params[k] for k in keys})
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            params = {**params, **{k: params[k] - self.inner_lr * grads[k] for k in keys}}
        return params

    def adapt_batched(self, fmodel: FunctionalModel, params: Params, x: Tensor, y: Tensor, steps: int, first_order: bool = False) -> Params:
        """The same inner loop for all tasks at once: params[name] is [T, ...], x is [T, N, ...]."""
        keys = self.inner_keys(fmodel) or list(params)
        for step in range(steps):
            losses = fmodel.objective.task_loss(batched_forward(fmodel.module, params, x, step), y)
            grads = torch.autograd.grad(losses.sum(), [params[k] for k in keys], create_graph=not first_order)
            params = {**params, **{k: params[k] - self.inner_lr * g for k, g in zip(keys, grads)}}
        return params

    def meta_step(self, fmodel: FunctionalModel, tasks: TaskBatch, iteration: int = 0) -> MetaStep:
        params = fmodel.params()
        first_order = self.is_first_order(iteration)
        objective = fmodel.objective
        how = self.execution(fmodel, tasks)
        if how in ("batched", "loop") and supports(fmodel.module):

            def query_losses(part: TaskBatch) -> tuple[Tensor, Tensor]:
                adapted = self.adapt_batched(fmodel, expand(params, part.num_tasks), part.support_x, part.support_y, self.inner_steps, first_order)
                prediction = batched_forward(fmodel.module, adapted, part.query_x, self.inner_steps)
                return objective.task_loss(prediction, part.query_y), objective.task_metric(prediction, part.query_y)

            losses, metrics = over_task_slices(query_losses, tasks, self.chunk(fmodel, tasks, how))
            loss = losses.mean()
            return MetaStep(loss=loss, metrics={"loss": loss.detach(), objective.metric_name: metrics.detach().mean()})

        def query_loss(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor):
            adapted = self.adapt(fmodel, params, support_x, support_y, self.inner_steps, first_order)
            prediction = fmodel(adapted, query_x, self.inner_steps)
            return objective.loss(prediction, query_y), objective.metric(prediction, query_y)

        losses, metrics = over_tasks(query_loss, how, *tasks.tensors())
        loss = losses.mean()
        return MetaStep(
            loss=loss,
            metrics={"loss": loss.detach(), objective.metric_name: metrics.detach().mean()},
        )
