"""What every algorithm shares: the inner loop, evaluation by adaptation (score the query set after
each inner step on the support set), and the outer optimizer.

An algorithm is written once, for T tasks with per-task parameters ([T, *shape]) and a model that
evaluates them (`metalearn_cli.functional.TaskModel`). Which kernel runs the tasks and how many go
in one pass is `self.execution`'s choice (`metalearn_cli.execution`), never the algorithm's. What a
task is (supervised examples, episodes, unlabeled images) is the task's business: the algorithm asks
it for losses and metrics of given parameters (`metalearn_cli.tasks.base.Tasks`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from metalearn_cli import batched, options
from metalearn_cli.algorithms.inner_optim import InnerSGD
from metalearn_cli.execution import Execution
from metalearn_cli.functional import FunctionalModel, TaskModel
from metalearn_cli.tasks.base import Params, Tasks


@dataclass
class MetaStep:
    """The result of one meta-iteration's computation.

    Either `loss`, a differentiable meta-objective whose gradient the outer optimizer follows
    (MAML, FO-MAML, fine-tuning), or `direction`, an explicit per-parameter update direction that
    is used as the gradient (Reptile: theta - mean(adapted theta)).

    `weight`: how many things `loss`, `direction` and `metrics` are means over (None: the tasks it was
    computed on). Ranks that each hold part of a meta-batch combine their steps weighted by it, so
    the result is the mean over the whole meta-batch however it was split.
    """

    loss: Tensor | None = None
    direction: Params | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)
    weight: float | None = None

    def weight_on(self, tasks: Tasks) -> float:
        """`weight`, or the number of `tasks` (what the step was computed on)."""
        return float(tasks.num_tasks if self.weight is None else self.weight)


@dataclass
class Evaluation:
    """What evaluation by adaptation gives for T tasks.

    scores: [T, steps + 1], column k the query metric after k adaptation steps (`Algorithm.evaluate`).
    report: {name: [T]}, the task's further scores of its query set after the last step, from the same
        predictions as the last column (`Tasks.query_report`: macro-F1 and mean per-class recall for
        classification, nothing for regression)."""

    scores: Tensor
    report: dict[str, Tensor] = field(default_factory=dict)


def adapt(
    model: TaskModel,
    theta: Params,
    tasks: Tasks,
    steps: int,
    optimizer,
    keys: list[str] | None = None,
    differentiable: bool = False,
    first_order: bool = False,
    batches: Tensor | None = None,
    after_step: Callable[[int, Params], None] | None = None,
) -> tuple[Params, dict]:
    """`steps` steps of the inner `optimizer` from theta, for every task at once, on each task's
    support loss. Returns the adapted [T, ...] parameters and the optimizer's final state.

    keys: the parameters adapted (default all; the others keep theta's value in every task).
    differentiable: keep the graph from theta through every step (MAML's meta-gradient flows back
        through the inner gradients, unless `first_order`, which treats them as constants);
        otherwise each step starts from detached parameters (evaluation, Reptile).
    batches: [T, steps, b] support examples each step sees (None: the whole support set).
    after_step(k, params): sees the parameters after step k (in the caller's grad mode).
    A pruned model's masks (`FunctionalModel.masked`) are applied after every step.
    Tasks are independent, so the gradient of the sum of their losses with respect to the per-task
    parameters is every task's own gradient."""
    params = batched.expand(theta, tasks.num_tasks)
    keys = list(params) if keys is None else keys
    state = optimizer.init({k: params[k] for k in keys})
    for step in range(steps):
        if differentiable:
            leaves = {k: params[k] for k in keys}
        else:
            leaves = {k: params[k].detach().requires_grad_(True) for k in keys}
        with torch.enable_grad():
            losses = tasks.support_loss(model, {**params, **leaves}, step, None if batches is None else batches[:, step])
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()), create_graph=differentiable and not first_order)
        grads = dict(zip(leaves, grads))
        if differentiable:
            adapted, state = optimizer.step(leaves, grads, state)
        else:
            with torch.no_grad():
                adapted, state = optimizer.step({k: v.detach() for k, v in leaves.items()}, grads, state)
        # a pruned network's zeros hold through every inner step, whatever the update
        params = {**params, **model.fmodel.masked(adapted)}
        if after_step is not None:
            after_step(step + 1, params)
    return params, state


def step_sizes(key: str, value: Any, meaning: str) -> float | tuple[float, ...] | None:
    """A step size (a finite number > 0), or a schedule of them, one per adaptation step with the last
    repeating (a non-empty list: [0.1, 0.05] is 0.1 for the first step and 0.05 for every later one);
    a one-entry list is its number; None where the caller has a default."""
    if not isinstance(value, (list, tuple)):
        return options.number(key, value, meaning, optional=True)
    allowed = f"a finite number > 0, or a non-empty list of them, one per step, the last repeating ({meaning})"
    if not value:
        raise options.invalid(key, value, allowed)
    try:
        rates = tuple(options.number(key, v, meaning) for v in value)
    except options.OptionError:
        raise options.invalid(key, list(value), allowed) from None
    return rates[0] if len(rates) == 1 else rates


def annealed(optimizer: torch.optim.Optimizer, final: float, max_steps: int, shape: str) -> dict:
    """`optimizer` with its learning rate annealed from the initial one to `final` times it over
    `max_steps` meta-iterations, linearly or along a half cosine, then held there (Lightning's
    `configure_optimizers` format; the scheduler steps once per meta-iteration)."""
    total = max(int(max_steps), 1)

    def multiplier(step: int) -> float:  # of the initial rate after `step` meta-updates
        progress = min(step, total) / total
        fall = progress if shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))
        return 1.0 - (1.0 - final) * fall

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Algorithm(ABC):
    """Base of every meta-learning algorithm.

    inner_lr, inner_steps: the inner loop used in meta-training.
    eval_inner_steps, eval_inner_lr: the adaptation used to score validation and test tasks (eval_inner_lr:
        a step size, or a list of them, one per step, the last repeating; None: inner_lr).
    outer_lr: the meta-optimizer's learning rate.
    vectorize, task_chunk, task_threads: how the tasks of a batch run (`metalearn_cli.execution.Execution`).
    """

    name = "algorithm"
    #: whether the algorithm adapts by an inner loop (ProtoNets do not: their inner settings are unused)
    has_inner_loop = True
    #: whether a task is scored through the model's own output layer, so that a classification task must
    #: have as many classes as it has outputs (ProtoNets and the fine-tune baselines classify any number)
    head_fixes_ways = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "evaluate" in cls.__dict__:  # the module calls `evaluation`: an override of `evaluate` would go unused
            raise TypeError(f"{cls.__name__} overrides Algorithm.evaluate; override Algorithm.evaluation instead")

    def __init__(
        self,
        inner_lr: float,
        inner_steps: int,
        eval_inner_steps: int,
        outer_lr: float,
        eval_inner_lr: float | Sequence[float] | None = None,
        vectorize: str = "auto",
        task_chunk: int | str = "auto",
        task_threads: int | str = "auto",
    ) -> None:
        if self.has_inner_loop:
            options.number("inner_lr", inner_lr, "the inner-loop learning rate")
            options.integer("inner_steps", inner_steps, "inner-loop steps per task in meta-training")
            options.integer("eval_inner_steps", eval_inner_steps, "adaptation steps at validation and test")
            eval_inner_lr = step_sizes("eval_inner_lr", eval_inner_lr, "the learning rate of adaptation at validation and test")
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = int(eval_inner_steps)
        #: one step size, or one per adaptation step (the last repeating): what `eval_optimizer`'s SGD takes
        self.eval_inner_lr: float | tuple[float, ...] = float(inner_lr) if eval_inner_lr is None else eval_inner_lr
        self.outer_lr = options.number("outer_lr", outer_lr, "the meta-optimizer's learning rate")
        self.execution = Execution(vectorize, task_chunk, task_threads)

    # -- meta-training --------------------------------------------------------------------
    def extra_modules(self, model: nn.Module, source: Any, sampler: Any) -> dict[str, nn.Module]:
        """Trainable modules the algorithm needs besides the model (saved in checkpoints)."""
        return {}

    def configure_optimizers(self, parameters: Iterable[nn.Parameter], max_steps: int) -> dict:
        return {"optimizer": torch.optim.Adam(parameters, lr=self.outer_lr)}

    @abstractmethod
    def meta_step(self, fmodel: FunctionalModel, tasks: Tasks, iteration: int = 0) -> MetaStep:
        """Compute one meta-iteration over `tasks` (does not touch the model's parameters);
        `iteration` is its 0-based index in the run, for algorithms that change with it."""

    def inner_keys(self, fmodel: FunctionalModel) -> list[str] | None:
        """The parameters adaptation updates, at meta-training and evaluation alike; None: all."""
        return None

    def inner_update(self):
        """The update of meta-training's inner loop (what batch-norm statistics are recorded along)."""
        return InnerSGD(self.inner_lr)

    @torch.no_grad()
    def record_statistics(self, fmodel: FunctionalModel, tasks: Tasks) -> None:
        """Update running batch-norm statistics (modes frozen and per_step) from the support sets of
        `tasks`, at the initialisation and (per_step) after each inner step of meta-training's
        update. Runs task by task with the plain forward pass, after the meta-update; never inside
        the inner loop."""
        if not fmodel.stat_layers:
            return
        per_step = any(layer.mode == "per_step" for layer in fmodel.stat_layers)
        steps = self.inner_steps if per_step else 0
        theta = {k: v.detach() for k, v in fmodel.params().items()}
        model = fmodel.on("loop")  # the module's own forward, where MetaBatchNorm2d records
        with fmodel.recording():
            for i in range(tasks.num_tasks):
                task = tasks.slice(i, i + 1)
                adapted, _ = adapt(model, theta, task, steps, self.inner_update(), self.inner_keys(fmodel))
                task.support_loss(model, adapted, steps)
        for layer in fmodel.stat_layers:  # steps never seen in training reuse the last one
            if layer.mode == "per_step" and steps + 1 < layer.running_mean.shape[0]:
                layer.running_mean[steps + 1 :] = layer.running_mean[steps]
                layer.running_var[steps + 1 :] = layer.running_var[steps]

    # -- evaluation -------------------------------------------------------------------------
    def eval_optimizer(self):
        return InnerSGD(self.eval_inner_lr)

    def eval_protocol(self) -> dict:
        """How validation and test tasks are adapted, as `test.json` and `eval.json` record it (a schedule of
        step sizes as its list, the last entry used for every later step)."""
        lr = list(self.eval_inner_lr) if isinstance(self.eval_inner_lr, tuple) else self.eval_inner_lr
        return {"eval_inner_lr": lr, "eval_inner_optimizer": "sgd", "eval_inner_batch_size": None}

    def eval_support_indices(self, tasks: Tasks, steps: int) -> Tensor | None:
        """[T, steps, b]: the support examples each adaptation step of evaluation sees, or None for the
        whole support set at every step (the default)."""
        return None

    def evaluate(self, fmodel: FunctionalModel, tasks: Tasks, steps: int | None = None) -> Tensor:
        """[T, steps + 1]: the query metric before and after each adaptation step (`evaluation`'s scores)."""
        return self.evaluation(fmodel, tasks, steps).scores

    def evaluation(self, fmodel: FunctionalModel, tasks: Tasks, steps: int | None = None) -> Evaluation:
        """Adapt to each task's support set and score its query set before and after each step.

        Returns the [T, steps + 1] scores (column k: the query metric after k inner steps) and the
        task's report of the query predictions after the last step. Algorithms that evaluate
        differently override this method (never `evaluate`, which only returns its scores). Works
        inside Lightning's validation/test loops (which run under no_grad).
        """
        steps = self.eval_inner_steps if steps is None else steps
        theta = {k: v.detach() for k, v in fmodel.params().items()}
        indices = self.eval_support_indices(tasks, steps)
        extra = () if indices is None else (indices.to(tasks.device),)

        def scores(model: TaskModel, part: Tasks, *index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            out: list[Tensor] = []
            report: dict[str, Tensor] = {}

            def score(step: int, params: Params) -> None:
                if step < steps:
                    out.append(part.query_metric(model, params, step))
                else:  # the last step's predictions give the report too
                    metric, last = part.query_metric_and_report(model, params, step)
                    out.append(metric)
                    report.update(last)

            score(0, batched.expand(theta, part.num_tasks))
            self.eval_adapt(model, theta, part, steps, index[0] if index else None, after_step=score)
            return torch.stack(out, dim=1), report

        scores, report = self.execution.run(scores, fmodel, tasks, *extra)
        return Evaluation(scores.detach(), {name: value.detach() for name, value in report.items()})

    def eval_adapt(self, model: TaskModel, theta: Params, tasks: Tasks, steps: int, batches: Tensor | None = None,
                   after_step: Callable[[int, Params], None] | None = None) -> Params:
        """Evaluation's adaptation: `steps` steps of `eval_optimizer` from theta on each task's support set (the
        examples `batches` names at each step, where given), on the parameters `inner_keys` names."""
        return adapt(model, theta, tasks, steps, self.eval_optimizer(), self.inner_keys(model.fmodel),
                     batches=batches, after_step=after_step)[0]

    # -- one adapted task as a network of its own (`metalearn export`) -----------------------------
    def adapted_network(self, fmodel: FunctionalModel, task: Tasks, bn_batch: str = "support") -> nn.Module:
        """The predictor `evaluation` scores `task` (one supervised task) with after its last adaptation step, as
        a plain network (`metalearn_cli.compression.adapted`): theta adapted as `eval_adapt` adapts it, batch
        norm fixed from the `bn_batch` images ("support" or "query"; or the stored statistics of that step). The
        module must be in eval mode, as at test; algorithms that classify otherwise (ProtoNets, the fine-tune
        baselines) override this."""
        from metalearn_cli.compression.adapted import fixed_network, statistics_images

        task = one_task(task)
        steps = self.eval_inner_steps
        theta = {k: v.detach() for k, v in fmodel.params().items()}
        indices = self.eval_support_indices(task, steps)
        extra = () if indices is None else (indices.to(task.device),)
        adapted = self.execution.run(
            lambda model, part, *index: self.eval_adapt(model, theta, part, steps, index[0] if index else None), fmodel, task, *extra)
        return fixed_network(fmodel, {k: v[0] for k, v in adapted.items()}, statistics_images(task, bn_batch), steps)


def one_task(task: Tasks) -> "TaskBatch":
    """`task` if it is one supervised task (what an adapted network is made from)."""
    from metalearn_cli.tasks import TaskBatch

    if not isinstance(task, TaskBatch) or task.num_tasks != 1:
        count = getattr(task, "num_tasks", "?")
        raise TypeError(f"an adapted network is made from one supervised task (a TaskBatch of 1 task), not {type(task).__name__} of {count}")
    return task
