"""Reptile (Nichol, Achiam, Schulman 2018).

For each task i of a meta-batch, run `inner_steps` steps of SGD or Adam from theta on the task's
support set (full batch, or mini-batches of `inner_batch_size` drawn without replacement, epoch by
epoch), giving theta~_i. The meta-update is

    theta <- theta + epsilon * mean_i (theta~_i - theta),

with the meta step size epsilon annealed linearly from `outer_lr` to `outer_lr_final` over the
run (the paper anneals to 0). It is applied as an SGD step on the "gradient"
theta - mean_i theta~_i, so the step size lives in an ordinary optimizer + LR scheduler and is
checkpointed and resumed like any other.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad

from metalearn_cli.algorithms.base import Algorithm, FunctionalModel, MetaStep, adapt_detached, over_task_slices, over_tasks
from metalearn_cli.algorithms.inner_optim import make_inner_optimizer
from metalearn_cli.batched import batched_forward, supports
from metalearn_cli.tasks import TaskBatch


class Reptile(Algorithm):
    name = "reptile"

    def __init__(
        self,
        *args,
        inner_optimizer: str = "sgd",
        inner_betas: Sequence[float] = (0.0, 0.999),
        inner_batch_size: int | None = None,
        eval_inner_optimizer: str = "sgd",
        outer_lr_final: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.inner_optimizer = inner_optimizer
        self.inner_betas = tuple(inner_betas)
        self.inner_batch_size = inner_batch_size
        self.eval_inner_optimizer = eval_inner_optimizer
        self.outer_lr_final = float(outer_lr_final)

    def configure_optimizers(self, parameters: Iterable[nn.Parameter], max_steps: int) -> dict:
        optimizer = torch.optim.SGD(parameters, lr=self.outer_lr)
        final = self.outer_lr_final / self.outer_lr
        total = max(int(max_steps), 1)

        def epsilon(step: int) -> float:  # multiplier of outer_lr after `step` meta-updates
            return 1.0 - (1.0 - final) * min(step, total) / total

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, epsilon)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def eval_optimizer(self):
        return make_inner_optimizer(self.eval_inner_optimizer, self.eval_inner_lr, self.inner_betas)

    def _batch_indices(self, tasks: TaskBatch) -> Tensor:
        """[T, inner_steps, b] indices into each task's support set: shuffled epochs, consecutive chunks."""
        num_tasks, support = tasks.support_x.shape[:2]
        b = self.inner_batch_size
        if b is None or b >= support:
            return torch.arange(support).expand(num_tasks, self.inner_steps, support)
        generator = torch.Generator().manual_seed(tasks.seed)
        epochs = -(-self.inner_steps * b // support)
        order = torch.cat([torch.rand(num_tasks, support, generator=generator).argsort(1) for _ in range(epochs)], 1)
        return order[:, : self.inner_steps * b].reshape(num_tasks, self.inner_steps, b)

    def meta_step(self, fmodel: FunctionalModel, tasks: TaskBatch) -> MetaStep:
        theta = {k: p.detach() for k, p in fmodel.params().items()}
        optimizer = make_inner_optimizer(self.inner_optimizer, self.inner_lr, self.inner_betas)
        indices = self._batch_indices(tasks).to(tasks.support_x.device)

        def adapt(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, index: Tensor):
            params, state = theta, optimizer.init(theta)
            for step in range(self.inner_steps):
                x, y = support_x[index[step]], support_y[index[step]]
                params, state = optimizer.step(params, grad(fmodel.loss)(params, x, y, step), state)
            return params, fmodel.loss(params, query_x, query_y, self.inner_steps)

        how = self.execution(fmodel, tasks)
        with torch.enable_grad():
            if how in ("batched", "loop") and supports(fmodel.module):  # the loop: the same code, one task at a time
                adapted, query_losses = over_task_slices(
                    lambda part, index: self._adapt_batched(fmodel, theta, optimizer, part, index),
                    tasks, self.chunk(fmodel, tasks, how), indices,
                )
            else:
                adapted, query_losses = over_tasks(adapt, how, *tasks.tensors(), indices)
        direction = {k: theta[k] - adapted[k].mean(0) for k in theta}
        return MetaStep(direction=direction, metrics={"loss": query_losses.mean()})

    def _adapt_batched(self, fmodel: FunctionalModel, theta, optimizer, tasks: TaskBatch, indices: Tensor):
        """The same inner loop for all tasks at once (see metalearn_cli.batched)."""
        rows = torch.arange(tasks.num_tasks, device=indices.device).unsqueeze(1)
        params = adapt_detached(
            fmodel, theta, optimizer, tasks.num_tasks,
            lambda step: (tasks.support_x[rows, indices[:, step]], tasks.support_y[rows, indices[:, step]]), self.inner_steps,
        )
        with torch.no_grad():
            prediction = batched_forward(fmodel.module, params, tasks.query_x, self.inner_steps)
            query_losses = fmodel.objective.task_loss(prediction, tasks.query_y)
        return params, query_losses
