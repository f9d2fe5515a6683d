"""What every algorithm shares: the model seen as a function, task-parallel execution, and
evaluation by adaptation (score the query set after each inner step on the support set)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metalearn_cli import batched
from metalearn_cli.config_checks import INNER_PARAMS, VECTORIZE_CHOICES  # noqa: F401  (re-exported)
from metalearn_cli.algorithms.inner_optim import InnerSGD
from metalearn_cli.models import MLP, MetaBatchNorm2d
from metalearn_cli.tasks import Objective, TaskBatch

Params = dict[str, Tensor]

#: auto: the largest support set (examples per task) for which grouped convolutions beat the loop
AUTO_BATCHED_MAX_SUPPORT = 20
#: auto: tasks per grouped convolution in `batched` execution of conv nets. With 32 tasks in one pass
#: the double backward of batch norm and of grouped convolutions holds ~60 MiB of temporaries on
#: Omniglot 5-way 1-shot (more than the per-task loop needs in all); 8 tasks per pass hold a quarter of
#: that, run second order faster and first order ~10% slower (BENCHMARKS.md, "Memory" and "Speed").
#: On a GPU the whole meta-batch goes in one pass: on an H200, 8 per pass was 2.7x (second order)
#: and 3.1x (first order) slower than 32 per pass, and memory is no concern at these sizes.
AUTO_CONV_TASK_CHUNK = 8



class FunctionalModel:
    """An `nn.Module` used as the pure function f(params, x), plus the task objective.

    `step` tells layers with per-step state (batch norm in `per_step` mode) which inner step of
    adaptation is running; it is plain Python state, so it works in a loop and under vmap alike.
    """

    def __init__(self, module: nn.Module, objective: Objective) -> None:
        self.module = module
        self.objective = objective
        self.stat_layers = [m for m in module.modules() if isinstance(m, MetaBatchNorm2d) and m.mode != "transductive"]

    def params(self) -> Params:
        return dict(self.module.named_parameters())

    def inner_keys(self, which: str = "all") -> list[str]:
        """The names of the parameters an inner loop adapts; the others keep the initialisation's
        value in every task (and are still meta-learned by the outer loop).

        all: every parameter (MAML as the paper describes it). no_bn: all but batch norm's scale and
        shift (what the MAML reference code adapts: its batch-norm variables sit outside the weights
        its inner loop updates). head: only the final linear layer (ANIL, Raghu et al. 2020)."""
        names = list(self.params())
        if which == "all":
            return names
        if which == "no_bn":
            norms = {
                ".".join(filter(None, (prefix, name)))
                for prefix, layer in self.module.named_modules()
                if isinstance(layer, (MetaBatchNorm2d, nn.modules.batchnorm._NormBase))
                for name, _ in layer.named_parameters(recurse=False)
            }
            return [n for n in names if n not in norms]
        if which == "head":
            head = [n for n in names if n.startswith("head.")]
            if not head:
                raise ValueError(f"algo.inner_params=head adapts the layer named `head`, and {type(self.module).__name__} has none")
            return head
        raise ValueError(f"unknown inner_params {which!r}; allowed: {', '.join(INNER_PARAMS)}")

    def __call__(self, params: Params, x: Tensor, step: int = 0) -> Tensor:
        for layer in self.stat_layers:
            layer.step = step
        return functional_call(self.module, (params, dict(self.module.named_buffers())), (x,))

    def loss(self, params: Params, x: Tensor, y: Tensor, step: int = 0) -> Tensor:
        return self.objective.loss(self(params, x, step), y)

    @torch.no_grad()
    def record_statistics(self, tasks: "TaskBatch", inner_steps: int, inner_lr: float, keys: list[str] | None = None) -> None:
        """Update running batch-norm statistics (modes frozen and per_step) from the support sets
        of `tasks`, at the initialisation and (per_step) after each of `inner_steps` SGD steps on
        the parameters named in `keys` (default all).
        Runs task by task outside any transform, after the meta-update; never inside the inner loop."""
        if not self.stat_layers:
            return
        per_step = any(layer.mode == "per_step" for layer in self.stat_layers)
        steps = inner_steps if per_step else 0
        theta = {k: v.detach() for k, v in self.params().items()}
        for i in range(tasks.num_tasks):
            x, y = tasks.support_x[i], tasks.support_y[i]
            params = theta
            for step in range(steps + 1):
                for layer in self.stat_layers:
                    layer.recording = True
                try:
                    self(params, x, step)
                finally:
                    for layer in self.stat_layers:
                        layer.recording = False
                if step < steps:
                    grads = grad(self.loss)(params, x, y, step)
                    params = {k: p - inner_lr * grads[k] if keys is None or k in keys else p for k, p in params.items()}
        for layer in self.stat_layers:  # steps never seen in training reuse the last one
            if layer.mode == "per_step" and steps + 1 < layer.running_mean.shape[0]:
                layer.running_mean[steps + 1 :] = layer.running_mean[steps]
                layer.running_var[steps + 1 :] = layer.running_var[steps]


@dataclass
class MetaStep:
    """The result of one meta-iteration's computation.

    Either `loss`, a differentiable meta-objective whose gradient the outer optimizer follows
    (MAML, FO-MAML, fine-tuning), or `direction`, an explicit per-parameter update direction that
    is used as the gradient (Reptile: theta - mean(adapted theta)).
    """

    loss: Tensor | None = None
    direction: Params | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _stack(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.stack(outputs)
    if isinstance(first, dict):
        return {k: _stack([o[k] for o in outputs]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([o[i] for o in outputs]) for i in range(len(first)))
    raise TypeError(f"cannot stack outputs of type {type(first).__name__}")


def over_tasks(fn: Callable[..., Any], how: str, *per_task: Tensor) -> Any:
    """Apply fn to every task (dimension 0 of each tensor in `per_task`) and stack the results.

    how="vmap" runs all tasks at once with torch.func.vmap; how="loop" runs them one by one.
    Both compute the same function; which is faster depends on the model and the device.
    """
    if how == "vmap":
        return vmap(fn)(*per_task)
    if how == "loop":
        return _stack([fn(*(t[i] for t in per_task)) for i in range(per_task[0].shape[0])])
    raise ValueError(f"unknown task execution {how!r}; allowed: vmap, loop")


def over_task_slices(fn: Callable[..., Any], tasks: TaskBatch, chunk: int, *per_task: Tensor) -> Any:
    """fn(part, *per_task_part) -> per-task results [t, ...] for consecutive slices of at most `chunk`
    tasks (and the matching rows of each tensor in `per_task`), concatenated over the slices.

    chunk >= T runs all tasks in one call; chunk = 1 is the loop over tasks. The autograd graph of
    each slice is separate, so the outer backward frees one slice's temporaries before the next."""
    if chunk >= tasks.num_tasks:
        return fn(tasks, *per_task)
    parts = [
        fn(tasks.slice(i, min(i + chunk, tasks.num_tasks)), *(t[i : i + chunk] for t in per_task))
        for i in range(0, tasks.num_tasks, chunk)
    ]
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    return type(first)(
        {k: torch.cat([p[i][k] for p in parts]) for k in first[i]} if isinstance(first[i], dict) else torch.cat([p[i] for p in parts])
        for i in range(len(first))
    )


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
    eval_inner_steps, eval_inner_lr: the adaptation used to score validation and test tasks.
    outer_lr: the meta-optimizer's learning rate.
    vectorize: how tasks of a batch are run (see `over_tasks`); "auto" picks per workload.
    task_chunk: with `batched` execution, how many tasks run in one pass; "auto" picks per model.
    """

    name = "algorithm"

    def __init__(
        self,
        inner_lr: float,
        inner_steps: int,
        eval_inner_steps: int,
        outer_lr: float,
        eval_inner_lr: float | None = None,
        vectorize: str = "auto",
        task_chunk: int | str = "auto",
    ) -> None:
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = int(eval_inner_steps)
        self.eval_inner_lr = float(eval_inner_lr if eval_inner_lr is not None else inner_lr)
        self.outer_lr = float(outer_lr)
        self.vectorize = vectorize
        self.task_chunk = task_chunk

    # -- execution strategy ---------------------------------------------------------------
    def execution(self, fmodel: FunctionalModel, tasks: TaskBatch | None = None, examples: int | None = None) -> str:
        """How the tasks of a batch run. `auto` follows the measurements in BENCHMARKS.md:

        * `batched` for the MLP, and for Conv4 while each inner step sees few examples per task (at
          most AUTO_BATCHED_MAX_SUPPORT; `examples`, default the whole support set; Reptile's inner
          mini-batches are smaller): grouped convolutions win when each task alone is too small to
          keep the cores busy;
        * `loop` for Conv4 with larger support sets, where each task is a large enough batch on its
          own and the double backward of grouped convolutions costs more than it saves (for the
          models of metalearn_cli.batched the loop runs that same code on one task at a time);
        * `vmap` for models `metalearn_cli.batched` does not know.
        """
        if self.vectorize == "batched" and not batched.supports(fmodel.module):
            raise ValueError(f"algo.vectorize=batched does not support {type(fmodel.module).__name__}; use vmap or loop")
        if self.vectorize != "auto":
            return self.vectorize
        if not batched.supports(fmodel.module):
            return "vmap"
        if isinstance(fmodel.module, MLP) or tasks is None:
            return "batched"
        examples = tasks.support_x.shape[1] if examples is None else examples
        return "batched" if examples <= AUTO_BATCHED_MAX_SUPPORT else "loop"

    def chunk(self, fmodel: FunctionalModel, tasks: TaskBatch, how: str) -> int:
        """Tasks per pass for `over_task_slices`: 1 for the loop; with `batched`, `task_chunk`, whose
        `auto` is every task at once for the MLP (it is small; one pass saves Python overhead) and on
        accelerators (fewer, larger kernels), and AUTO_CONV_TASK_CHUNK for conv nets on the CPU (bounds
        the double backward's temporaries; see its comment)."""
        if how == "loop":
            return 1
        if self.task_chunk != "auto":
            return int(self.task_chunk)
        if isinstance(fmodel.module, MLP) or tasks.support_x.device.type != "cpu":
            return tasks.num_tasks
        return AUTO_CONV_TASK_CHUNK

    # -- meta-training --------------------------------------------------------------------
    def extra_modules(self, model: nn.Module, source: Any, sampler: Any) -> dict[str, nn.Module]:
        """Trainable modules the algorithm needs besides the model (saved in checkpoints)."""
        return {}

    def configure_optimizers(self, parameters: Iterable[nn.Parameter], max_steps: int) -> dict:
        return {"optimizer": torch.optim.Adam(parameters, lr=self.outer_lr)}

    @abstractmethod
    def meta_step(self, fmodel: FunctionalModel, tasks: TaskBatch, iteration: int = 0) -> MetaStep:
        """Compute one meta-iteration over `tasks` (does not touch the model's parameters);
        `iteration` is its 0-based index in the run, for algorithms that change with it."""

    def inner_keys(self, fmodel: FunctionalModel) -> list[str] | None:
        """The parameters adaptation updates, at meta-training and evaluation alike; None: all."""
        return None

    # -- evaluation -------------------------------------------------------------------------
    def eval_optimizer(self):
        return InnerSGD(self.eval_inner_lr)

    def eval_protocol(self) -> dict:
        """How validation and test tasks are adapted, as `test.json` and `eval.json` record it."""
        return {"eval_inner_lr": self.eval_inner_lr, "eval_inner_optimizer": "sgd", "eval_inner_batch_size": None}

    def eval_support_indices(self, tasks: TaskBatch, steps: int) -> Tensor | None:
        """[T, steps, b]: the support examples each adaptation step of evaluation sees, or None for the
        whole support set at every step (the default)."""
        return None

    def evaluate(self, fmodel: FunctionalModel, tasks: TaskBatch, steps: int | None = None) -> Tensor:
        """Adapt to each task's support set and score its query set before and after each step.

        Returns a [T, steps + 1] tensor of the objective's metric: column k is the query metric
        after k inner steps. Gradients are taken with torch.func.grad, so this works inside
        Lightning's validation/test loops (which run under no_grad).
        """
        steps = self.eval_inner_steps if steps is None else steps
        params = {k: v.detach() for k, v in fmodel.params().items()}
        optimizer = self.eval_optimizer()
        metric = fmodel.objective.metric
        how = self.execution(fmodel, tasks)
        indices = self.eval_support_indices(tasks, steps)
        extra = () if indices is None else (indices.to(tasks.support_x.device),)
        keys = self.inner_keys(fmodel)
        if how in ("batched", "loop") and batched.supports(fmodel.module):
            return over_task_slices(
                lambda part, *index: self._evaluate_batched(fmodel, params, optimizer, part, steps, *index, keys=keys),
                tasks, self.chunk(fmodel, tasks, how), *extra,
            )
        keys = list(params) if keys is None else keys

        def score(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *index: Tensor) -> Tensor:
            adapted = dict(params)
            state = optimizer.init({k: adapted[k] for k in keys})
            scores = [metric(fmodel(adapted, query_x, 0), query_y)]
            for step in range(steps):
                x, y = (support_x[index[0][step]], support_y[index[0][step]]) if index else (support_x, support_y)
                sub = {k: adapted[k] for k in keys}
                grads = grad(lambda s: fmodel.loss({**adapted, **s}, x, y, step))(sub)
                sub, state = optimizer.step(sub, grads, state)
                adapted = {**adapted, **sub}
                scores.append(metric(fmodel(adapted, query_x, step + 1), query_y))
            return torch.stack(scores)

        with torch.enable_grad():
            return over_tasks(score, how, *tasks.tensors(), *extra).detach()

    @staticmethod
    def _evaluate_batched(fmodel: FunctionalModel, params: Params, optimizer, tasks: TaskBatch, steps: int,
                          indices: Tensor | None = None, keys: list[str] | None = None) -> Tensor:
        objective, module = fmodel.objective, fmodel.module
        rows = torch.arange(tasks.num_tasks, device=tasks.support_x.device).unsqueeze(1)

        def support(step: int) -> tuple[Tensor, Tensor]:  # the whole support set, or this step's mini-batches
            if indices is None:
                return tasks.support_x, tasks.support_y
            return tasks.support_x[rows, indices[:, step]], tasks.support_y[rows, indices[:, step]]

        def score(step: int, adapted: Params) -> Tensor:
            return objective.task_metric(batched.batched_forward(module, adapted, tasks.query_x, step), tasks.query_y)

        with torch.no_grad():
            scores = [score(0, batched.expand(params, tasks.num_tasks))]
        adapt_detached(fmodel, params, optimizer, tasks.num_tasks, support, steps,
                       after_step=lambda step, adapted: scores.append(score(step, adapted)), keys=keys)
        return torch.stack(scores, dim=1)


def adapt_detached(
    fmodel: FunctionalModel,
    theta: Params,
    optimizer,
    num_tasks: int,
    support: Callable[[int], tuple[Tensor, Tensor]],
    steps: int,
    after_step: Callable[[int, Params], None] | None = None,
    keys: list[str] | None = None,
) -> tuple[Params, dict]:
    """`steps` inner-optimizer steps from theta for `num_tasks` tasks at once (metalearn_cli.batched),
    with no graph through the steps: what evaluation and Reptile adapt with. `support(step)` gives
    the [T, n, ...] inputs and targets of that step; `after_step(k, params)` sees the parameters
    after k steps (under no_grad). Only the parameters named in `keys` (default all) are adapted.
    Returns the adapted [T, ...] parameters and the optimizer's final state (over `keys`)."""
    objective, module = fmodel.objective, fmodel.module
    params = batched.expand(theta, num_tasks)
    keys = list(params) if keys is None else keys
    state = optimizer.init({k: params[k] for k in keys})
    for step in range(steps):
        x, y = support(step)
        leaves = {k: params[k].detach().requires_grad_(True) for k in keys}
        with torch.enable_grad():
            losses = objective.task_loss(batched.batched_forward(module, {**params, **leaves}, x, step), y)
            grads = dict(zip(leaves, torch.autograd.grad(losses.sum(), list(leaves.values()))))
        with torch.no_grad():
            adapted, state = optimizer.step({k: v.detach() for k, v in leaves.items()}, grads, state)
            params = {**params, **adapted}
            if after_step is not None:
                after_step(step + 1, params)
    return params, state
