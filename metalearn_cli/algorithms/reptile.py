"""Reptile (Nichol, Achiam, Schulman 2018).

For each task i of a meta-batch, run `inner_steps` steps of SGD or Adam from theta on the task's
support set (full batch, or mini-batches of `inner_batch_size` drawn without replacement, epoch by
epoch), giving theta~_i. Evaluation adapts the same way with `eval_inner_batch_size` (the
reference's `--eval-batch`; null: the whole support set at every step). The meta-update is

    theta <- theta + epsilon * mean_i (theta~_i - theta),

with the meta step size epsilon annealed linearly from `outer_lr` to `outer_lr_final` over the
run (the paper anneals to 0). It is applied as an SGD step on the "gradient"
theta - mean_i theta~_i, so the step size lives in an ordinary optimizer + LR scheduler and is
checkpointed and resumed like any other.

The inner optimizer's state (`inner_state`): with `reset` every task's inner Adam starts from zero
moments at t = 0, so each of its first steps moves every weight by about the learning rate whatever
the gradient's size. With `carry`, as in the reference code (openai/supervised-reptile resets only
the trainable variables after a task), Adam's moments and step count carry over from task to task
and from meta-iteration to meta-iteration, and validation and test tasks start from them too. The
tasks of a meta-batch run in parallel here, each from the carried state; afterwards the state
becomes what running them one after another would have left if each task's gradients were the
same: older moments decay by beta^(K per task), and each task adds its own K steps (`_carry_over`).
The carried state is saved in checkpoints (buffers of `CarriedAdamState`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from metalearn_cli import options
from metalearn_cli.algorithms.base import Algorithm, MetaStep, adapt, annealed
from metalearn_cli.algorithms.inner_optim import INNER_OPTIMIZERS, make_inner_optimizer
from metalearn_cli.functional import FunctionalModel, TaskModel
from metalearn_cli.tasks.base import Tasks

#: algo.inner_state: where each task's inner Adam starts (see the module docstring)
INNER_STATES = ("reset", "carry")


class CarriedAdamState(nn.Module):
    """Adam's moments (one m and one v per model parameter) and step count carried from task to task.
    Buffers, so checkpoints save them, a resumed run restores them and they follow the model's device."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = [name for name, _ in model.named_parameters()]
        for name, p in model.named_parameters():
            self.register_buffer(self._key("m", name), torch.zeros_like(p.detach(), memory_format=torch.contiguous_format))
            self.register_buffer(self._key("v", name), torch.zeros_like(p.detach(), memory_format=torch.contiguous_format))
        self.register_buffer("t", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _key(moment: str, name: str) -> str:
        return f"{moment}__{name.replace('.', '__')}"

    def state(self) -> dict:
        """As InnerAdam's state: {"t": int, "m": {name: tensor}, "v": {name: tensor}}."""
        return {
            "t": int(self.t),
            "m": {n: getattr(self, self._key("m", n)) for n in self.names},
            "v": {n: getattr(self, self._key("v", n)) for n in self.names},
        }

    @torch.no_grad()
    def set(self, state: dict) -> None:
        self.t.fill_(state["t"])
        for moment in ("m", "v"):
            for n in self.names:
                getattr(self, self._key(moment, n)).copy_(state[moment][n])


class Reptile(Algorithm):
    name = "reptile"

    def __init__(
        self,
        *args,
        inner_optimizer: str = "sgd",
        inner_betas: Sequence[float] = (0.0, 0.999),
        inner_batch_size: int | None = None,
        eval_inner_batch_size: int | None = None,
        eval_inner_optimizer: str = "sgd",
        outer_lr_final: float = 0.0,
        inner_state: str = "reset",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.inner_optimizer = options.choice("inner_optimizer", inner_optimizer, INNER_OPTIMIZERS)
        self.eval_inner_optimizer = options.choice("eval_inner_optimizer", eval_inner_optimizer, INNER_OPTIMIZERS)
        if isinstance(self.eval_inner_lr, tuple) and self.eval_inner_optimizer != "sgd":
            raise options.invalid("eval_inner_lr", list(self.eval_inner_lr),
                                  "one number with eval_inner_optimizer=adam (a list of step sizes, one per step, is for sgd)")
        self.inner_batch_size = options.integer("inner_batch_size", inner_batch_size, "support examples per inner step", optional=True)
        self.eval_inner_batch_size = options.integer("eval_inner_batch_size", eval_inner_batch_size,
                                                     "support examples per adaptation step at validation and test", optional=True)
        self.outer_lr_final = options.number("outer_lr_final", outer_lr_final, "the meta step size at the last meta-iteration", strict=False)
        self.inner_state = options.choice("inner_state", inner_state, INNER_STATES)
        if inner_state == "carry" and inner_optimizer != "adam":
            raise options.OptionError(
                f"`{{p}}inner_state=carry` carries Adam's moments from task to task, but "
                f"`{{p}}inner_optimizer` is {inner_optimizer!r}, which has no state to carry. "
                "Allowed: {p}inner_state=reset, or {p}inner_optimizer=adam."
            )
        self.inner_betas = tuple(inner_betas)
        self.carried: CarriedAdamState | None = None

    def extra_modules(self, model: nn.Module, source, sampler) -> dict[str, nn.Module]:
        """With `inner_state=carry`, the carried Adam state (saved in checkpoints with the model)."""
        if self.inner_state != "carry":
            return {}
        self.carried = CarriedAdamState(model)
        return {"inner_state": self.carried}

    def _start(self, fmodel: FunctionalModel) -> dict | None:
        """The state each task's inner Adam starts from: the carried one, or None (zeros)."""
        if self.inner_state != "carry":
            return None
        if self.carried is None:  # an algorithm used without a MetaLearner (tests, bench)
            self.carried = CarriedAdamState(fmodel.module).to(next(fmodel.module.parameters()).device)
        return self.carried.state()

    def configure_optimizers(self, parameters: Iterable[nn.Parameter], max_steps: int) -> dict:
        optimizer = torch.optim.SGD(parameters, lr=self.outer_lr)  # epsilon, annealed linearly
        return annealed(optimizer, self.outer_lr_final / self.outer_lr, max_steps, "linear")

    def eval_optimizer(self):
        start = self.carried.state() if self.carried is not None else None
        return make_inner_optimizer(self.eval_inner_optimizer, self.eval_inner_lr, self.inner_betas, start=start)

    def eval_protocol(self) -> dict:
        """With Adam at test time: whether each task's Adam starts from zeros or from the state carried
        out of meta-training (`inner_state=carry`), and how many steps that state had seen."""
        protocol = {**super().eval_protocol(), "eval_inner_optimizer": self.eval_inner_optimizer,
                    "eval_inner_batch_size": self.eval_inner_batch_size}
        if self.eval_inner_optimizer == "adam":
            protocol["eval_adam_start"] = "zeros" if self.carried is None else "carried"
            if self.carried is not None:
                protocol["eval_adam_carried_steps"] = int(self.carried.t)
        return protocol

    def _batch_indices(self, tasks: Tasks) -> Tensor:
        """[T, inner_steps, b] indices into each task's support set for meta-training, drawn from the
        batch's seed."""
        num_tasks, support = tasks.num_tasks, tasks.support_size
        b = self.inner_batch_size
        if b is None or b >= support:
            return torch.arange(support).expand(num_tasks, self.inner_steps, support)
        return mini_batches(num_tasks, support, self.inner_steps, b, torch.Generator().manual_seed(tasks.seed))

    def eval_support_indices(self, tasks: Tasks, steps: int) -> Tensor | None:
        """With `eval_inner_batch_size` smaller than the support set: [T, steps, b] indices, task t's drawn
        from its own seed (`Tasks.task_seeds`), so a task gets the same mini-batches however the
        tasks are batched."""
        support, b = tasks.support_size, self.eval_inner_batch_size
        if b is None or b >= support:
            return None
        if tasks.task_seeds is None:  # tasks built by hand (tests, bench): one generator for the batch
            return mini_batches(tasks.num_tasks, support, steps, b, torch.Generator().manual_seed(tasks.seed))
        return torch.cat([mini_batches(1, support, steps, b, torch.Generator().manual_seed(int(seed))) for seed in tasks.task_seeds])

    def inner_update(self):
        return make_inner_optimizer(self.inner_optimizer, self.inner_lr, self.inner_betas, start=None if self.carried is None else self.carried.state())

    def meta_step(self, fmodel: FunctionalModel, tasks: Tasks, iteration: int = 0) -> MetaStep:
        """The update direction theta - mean_i theta~_i (does not touch the model's parameters; with
        `inner_state=carry` it advances the carried Adam state, as the reference's inner steps do)."""
        theta = {k: p.detach() for k, p in fmodel.params().items()}
        start = self._start(fmodel)
        optimizer = make_inner_optimizer(self.inner_optimizer, self.inner_lr, self.inner_betas, start=start)
        indices = self._batch_indices(tasks).to(tasks.device)

        def adapted(model: TaskModel, part: Tasks, index: Tensor):
            params, state = adapt(model, theta, part, self.inner_steps, optimizer, batches=index)
            with torch.no_grad():
                query_losses = part.query_loss(model, params, self.inner_steps)
            return params, query_losses, _moments(state, start is not None)

        # each step sees one mini-batch: the execution's `auto` rule goes by its size
        params, query_losses, moments = self.execution.run(adapted, fmodel, tasks, indices, examples=indices.shape[-1])
        if start is not None:
            self.carried.set(self._carry_over(start, moments, tasks.num_tasks))
        direction = {k: theta[k] - params[k].mean(0) for k in theta}
        return MetaStep(direction=direction, metrics={"loss": query_losses.mean()})

    def _carry_over(self, start: dict, final: dict, num_tasks: int) -> dict:
        """The carried state after `num_tasks` tasks that each ran `inner_steps` Adam steps from `start`
        in parallel (`final`: their [T, ...] moments, see `_moments`), combined as if they had run one after another:
        each moment is beta^(T K) * start + sum_i beta^((T - 1 - i) K) * (final_i - beta^K * start)."""
        steps, out = self.inner_steps, {"t": start["t"] + num_tasks * self.inner_steps}
        with torch.no_grad():
            for moment, beta in (("m", self.inner_betas[0]), ("v", self.inner_betas[1])):
                weights = torch.tensor([beta ** ((num_tasks - 1 - i) * steps) for i in range(num_tasks)], dtype=torch.float64)
                out[moment] = {}
                for k, old in start[moment].items():
                    new = final[f"{moment}:{k}"] - beta**steps * old
                    w = weights.to(new.device, new.dtype).view(-1, *([1] * old.dim()))
                    out[moment][k] = beta ** (num_tasks * steps) * old + (w * new).sum(0)
        return out


def mini_batches(num_tasks: int, support: int, steps: int, size: int, generator: torch.Generator) -> Tensor:
    """[num_tasks, steps, size] indices into a support set of `support` examples: each task's examples
    shuffled epoch after epoch and cut into consecutive mini-batches (a mini-batch may straddle two
    epochs), as the reference code's `_mini_batches` does without replacement."""
    epochs = -(-steps * size // support)
    order = torch.cat([torch.rand(num_tasks, support, generator=generator).argsort(1) for _ in range(epochs)], 1)
    return order[:, : steps * size].reshape(num_tasks, steps, size)


def _moments(state: dict, keep: bool) -> dict[str, Tensor]:
    """Adam's per-task moments as one flat dict ("m:<name>", "v:<name>"), or {} when not carried."""
    if not keep:
        return {}
    return {f"{moment}:{k}": value for moment in ("m", "v") for k, value in state[moment].items()}
