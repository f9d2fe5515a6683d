"""One trust-region step (TRPO, Schulman et al. 2015) in parameter space, as MAML's outer step in
reinforcement learning (Finn et al. 2017, whose reference code cbfinn/maml_rl uses rllab's
ConjugateGradientOptimizer).

Given a loss L(theta) to minimise (for MAML-RL: the negated importance-weighted surrogate of the
post-adaptation trajectories) and the mean KL divergence kl(theta) between the predictive
distributions (policies) adapted from theta_old and from theta:

1. g = grad L(theta_old);
2. s ~= (F + damping I)^-1 g by `cg_iters` steps of conjugate gradient, F the Hessian of kl at
   theta_old (the Fisher information of the adapted predictive distributions, pulled back to theta),
   used only through products F v;
3. the step s is scaled to the trust region's edge, beta = sqrt(2 max_kl / s^T (F + damping I) s);
4. backtracking line search: theta_old - r^j beta s for j = 0, 1, ... (r = 0.8, at most 15 tries),
   accepting the first whose loss is below L(theta_old) and whose KL is at most max_kl; if none is,
   theta stays where it was.

Fisher-vector products through an inner loop (`AdaptationFisher`): kl(theta) = k(a(theta)), with
a(theta) the per-task parameters adapted from theta and k the mean KL from the adapted parameters of
theta_old. The KL's gradient is zero where a = a_old, so its Hessian at theta_old is J^T H_k J,
J = da/dtheta: a product J v (the double-backward trick: J^T u is linear in u, and its derivative
with respect to u along v is J v), a Hessian-vector product of k in the adapted parameters (no inner
loop), and a vector-Jacobian product J^T w (a MAML meta-gradient's backward). No third-order autograd
through the inner loop is needed. With first-order adaptation the inner gradients are constants, so
J is the identity (copied to every task) and F v is the adapted-space product summed over tasks.

`TrustRegion` holds the step's settings (algo.max_kl, algo.trpo_damping, algo.trpo_cg_iters) and runs
one meta-iteration with it for any algorithm that says how a part's parameters come from theta:
MAML adapts them (the query loss after the inner loop), the pretrained baseline (algo=finetune on
episodes) uses theta itself (J the identity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from metalearn_cli import options
from metalearn_cli.algorithms.base import MetaStep

if TYPE_CHECKING:
    from metalearn_cli.execution import Execution
    from metalearn_cli.functional import FunctionalModel, TaskModel
    from metalearn_cli.tasks.base import Tasks

Params = dict[str, Tensor]
#: algo.outer_optimizer: Adam on the meta-gradient, or one trust-region step per meta-iteration
OUTER_OPTIMIZERS = ("adam", "trpo")
#: the line search shrinks the step by this factor after each rejected try (rllab's default)
BACKTRACK_RATIO = 0.8
#: how many steps the line search tries before giving up (rllab's default)
MAX_BACKTRACKS = 15


def flat(params: Params) -> Tensor:
    """The parameters as one vector, in the dict's order."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflat(vector: Tensor, like: Params) -> Params:
    """`vector` cut into tensors of the shapes of `like` (the inverse of `flat`)."""
    out, start = {}, 0
    for name, p in like.items():
        out[name] = vector[start : start + p.numel()].view_as(p)
        start += p.numel()
    return out


def _grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor] | None = None,
          create_graph: bool = False) -> list[Tensor]:
    """autograd.grad that keeps the graph for the next product and gives zeros for inputs the outputs do
    not depend on (e.g. a parameter the KL does not see)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs or [None] * len(outputs)) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(i) for i in inputs]
    outs, grads = zip(*pairs)
    return list(torch.autograd.grad(outs, inputs, None if grad_outputs is None else grads, retain_graph=True,
                                    create_graph=create_graph, allow_unused=True, materialize_grads=True))


def conjugate_gradient(product: Callable[[Tensor], Tensor], b: Tensor, iters: int, residual_tol: float = 1e-10) -> Tensor:
    """x with product(x) ~= b, for a symmetric positive definite linear map, after at most `iters`
    iterations of conjugate gradient from x = 0 (exact after as many iterations as b has entries,
    up to rounding); stops early once the squared residual is under `residual_tol`."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r.dot(r)
    for _ in range(iters):
        if rr < residual_tol:
            break
        z = product(p)
        alpha = rr / p.dot(z)
        x = x + alpha * p
        r = r - alpha * z
        new_rr = r.dot(r)
        p = r + (new_rr / rr) * p
        rr = new_rr
    return x


def hessian_vector_product(f: Callable[[Params], Tensor], theta: Params) -> Callable[[Tensor], Tensor]:
    """v -> H v, H the Hessian of the scalar f at theta (flat vectors), by double backward: the plain
    product, third order through an inner loop inside f (what `AdaptationFisher` avoids)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    with torch.enable_grad():
        gradient = _grad([f(leaves)], list(leaves.values()), create_graph=True)

    def product(v: Tensor) -> Tensor:
        return flat(dict(zip(leaves, _grad(gradient, list(leaves.values()), list(unflat(v, leaves).values())))))

    return product


class AdaptationFisher:
    """v -> F v (flat vectors over theta), F the Hessian at theta_old of the mean KL between the predictive
    distributions adapted from theta_old and from theta, as J^T H_k J (see the module docstring).

    theta: the leaves (requires_grad) the adapted parameters were computed from.
    parts: for each part of the tasks, its adapted parameters a ([t, ...] each, with the graph from
        theta) and k(params) -> scalar: that part's share of the mean KL from a's (detached) values to
        `params`'s (its parts sum to the mean over all tasks)."""

    def __init__(self, theta: Params, parts: Sequence[tuple[Params, Callable[[Params], Tensor]]]) -> None:
        self.theta = theta
        self.adapted: list[Tensor] = []
        self.parts = []
        with torch.enable_grad():
            for adapted, kl in parts:
                # H_k: the KL's gradient in the adapted parameters, with its graph, at the old values
                at = {k: v.detach().clone().requires_grad_(True) for k, v in adapted.items()}
                kl_gradient = _grad([kl(at)], list(at.values()), create_graph=True)
                # J v by double backward: J^T u is linear in u (a dummy at zero); its gradient in u along v is J v
                u = {k: torch.zeros_like(v, requires_grad=True) for k, v in adapted.items()}
                jtu = _grad(list(adapted.values()), list(theta.values()), list(u.values()), create_graph=True)
                self.parts.append((at, kl_gradient, u, jtu))
                self.adapted.extend(adapted.values())

    def __call__(self, v: Tensor) -> Tensor:
        directions = list(unflat(v, self.theta).values())
        weights: list[Tensor] = []
        with torch.enable_grad():
            for at, kl_gradient, u, jtu in self.parts:
                jv = _grad(jtu, list(u.values()), directions)
                weights.extend(_grad(kl_gradient, list(at.values()), jv))
            return flat(dict(zip(self.theta, _grad(self.adapted, list(self.theta.values()), weights))))


@dataclass
class TRPOStep:
    """What one trust-region step did.

    params: theta after the step (theta_old itself when the line search accepted nothing).
    loss_before, loss_after: the loss at theta_old and at `params`.
    kl: the mean KL of the accepted step (0 when none was).
    tries: line-search evaluations made; accepted: whether a step was taken."""

    params: Params
    loss_before: float
    loss_after: float
    kl: float
    tries: int
    accepted: bool


def no_reduction(value: Tensor) -> Tensor:
    """The means of one process's tasks are the means over all tasks."""
    return value


def trpo_step(
    theta: Params,
    gradient: Params,
    fisher_product: Callable[[Tensor], Tensor],
    loss_and_kl: Callable[[Params], tuple[float, float]],
    loss_before: float,
    max_kl: float = 0.01,
    damping: float = 1e-5,
    cg_iters: int = 10,
    backtrack_ratio: float = BACKTRACK_RATIO,
    max_backtracks: int = MAX_BACKTRACKS,
    reduce: Callable[[Tensor], Tensor] = no_reduction,
) -> TRPOStep:
    """One TRPO step from theta (see the module docstring).

    gradient: of the loss at theta. fisher_product: v -> F v at theta on flat vectors (without damping;
    `AdaptationFisher`, or `hessian_vector_product` of the KL). loss_and_kl(candidate): the loss at the
    candidate parameters and the mean KL from theta's predictive distributions to the candidate's
    (evaluated without a graph). loss_before: the loss at theta.

    reduce: where these are means over only a part of the tasks (a process's share of the meta-batch),
    the mean over all tasks of such a part's mean. Every quantity the step uses passes through it: the
    gradient with the loss before, each F v, and each candidate's loss with its KL. Then every part
    holds the same vectors, so conjugate gradient follows the same path and the line search accepts the
    same step in all of them."""
    theta = {k: v.detach() for k, v in theta.items()}
    g = flat({k: gradient[k].detach() for k in theta})
    reduced = reduce(torch.cat([g, g.new_tensor([loss_before])]))
    g, loss_before = reduced[:-1], reduced[-1].item()

    def damped(v: Tensor) -> Tensor:
        return reduce(fisher_product(v)) + damping * v

    with torch.no_grad():
        direction = conjugate_gradient(lambda v: damped(v).detach(), g, cg_iters)
        curvature = direction.dot(damped(direction).detach()).item()
        full_step = math.sqrt(2.0 * max_kl / (max(curvature, 0.0) + 1e-8)) * direction
    tries = 0
    for j in range(max_backtracks):
        tries += 1
        candidate = {k: theta[k] - p for k, p in unflat(backtrack_ratio**j * full_step, theta).items()}
        loss, kl = reduce(g.new_tensor(loss_and_kl(candidate))).tolist()
        if loss < loss_before and kl <= max_kl:
            return TRPOStep(candidate, loss_before, float(loss), float(kl), tries, True)
    return TRPOStep(theta, loss_before, loss_before, 0.0, tries, False)


def whole_batch(value: Tensor, weight: float) -> Tensor:
    """`TrustRegion.reduce` where the tasks a step sees are the whole meta-batch."""
    return value


#: how a part of the tasks gets its [t, ...] parameters from theta: (model, theta, part, differentiable) -> params,
#: with the graph from theta where differentiable (the meta-gradient and the Fisher products flow through it)
ParamsFromTheta = Callable[["TaskModel", Params, "Tasks", bool], Params]


class TrustRegion:
    """The TRPO outer step of an algorithm: its settings, checked as given, and one meta-iteration.

    max_kl: the limit on the mean KL between the predictive distributions (policies) before and after the
    step. damping: added to the Fisher-vector products. cg_iters: conjugate-gradient iterations.

    `reduce(value, weight)`: how a mean over the tasks this step sees (`weight` of them) becomes the mean
    over the whole meta-batch. The step's math needs every quantity whole (see `trpo_step`), but which
    part of the meta-batch this process holds is the trainer's business, not the algorithm's: the
    trainer sets it (data-parallel: a weighted all-reduce over the ranks), and by default the tasks seen
    are the whole meta-batch."""

    def __init__(self, max_kl: float = 0.01, damping: float = 1e-5, cg_iters: int = 10) -> None:
        self.max_kl = options.number("max_kl", max_kl, "the KL limit of a TRPO step")
        self.damping = options.number("trpo_damping", damping, "added to the Fisher-vector products", strict=False)
        self.cg_iters = options.integer("trpo_cg_iters", cg_iters, "conjugate-gradient iterations per TRPO step")
        self.reduce: Callable[[Tensor, float], Tensor] = whole_batch

    @staticmethod
    def configure_optimizers(parameters: Iterable[nn.Parameter]) -> dict:
        """theta - 1 * (theta - theta_new): plain SGD of rate 1 applies the step `meta_step` chose."""
        return {"optimizer": torch.optim.SGD(parameters, lr=1.0)}

    def meta_step(self, execution: "Execution", fmodel: "FunctionalModel", tasks: "Tasks", params_of: ParamsFromTheta,
                  step: int) -> MetaStep:
        """One trust-region step on the mean over tasks of `query_loss(params_of(theta), step)`, the KL being
        `query_kl` at that step, returned as the direction theta - theta_new. The line search computes each
        candidate's parameters again on the same task objects, so a task that caches what it collected
        (episodes) is scored on the same data throughout."""
        theta = {k: v.detach().requires_grad_(True) for k, v in fmodel.params().items()}
        num_tasks = tasks.num_tasks
        parts: list[tuple["TaskModel", "Tasks", Params]] = []

        def scores(model: "TaskModel", part: "Tasks") -> tuple[Tensor, Tensor]:
            params = params_of(model, theta, part, True)
            parts.append((model, part, params))
            return part.query_scores(model, params, step)

        losses, metrics = execution.run(scores, fmodel, tasks)
        loss = losses.mean()
        gradient = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()), retain_graph=True,
                                                       allow_unused=True, materialize_grads=True)))
        olds = [{k: v.detach() for k, v in params.items()} for _, _, params in parts]

        def kl_share(model: "TaskModel", part: "Tasks", old: Params) -> Callable[[Params], Tensor]:
            return lambda new: part.query_kl(model, old, new, step).sum() / num_tasks

        fisher = AdaptationFisher(theta, [(params, kl_share(model, part, old)) for (model, part, params), old in zip(parts, olds)])

        def loss_and_kl(candidate: Params) -> tuple[float, float]:
            total_loss = total_kl = 0.0
            for (model, part, _), old in zip(parts, olds):
                params = params_of(model, candidate, part, False)
                with torch.no_grad():
                    total_loss += part.query_loss(model, params, step).sum().item()
                    total_kl += part.query_kl(model, old, params, step).sum().item()
            return total_loss / num_tasks, total_kl / num_tasks

        result = trpo_step(theta, gradient, fisher, loss_and_kl, loss.item(), max_kl=self.max_kl,
                           damping=self.damping, cg_iters=self.cg_iters,
                           reduce=lambda value: self.reduce(value, float(num_tasks)))
        direction = {k: theta[k].detach() - result.params[k] for k in theta}
        like = loss.detach()
        # the loss and metric are this part's means, combined by whoever holds the parts; the step's own
        # numbers are the whole batch's already, the same in every part
        return MetaStep(direction=direction, metrics={
            "loss": like,
            tasks.objective.metric_name: metrics.detach().mean(),
            "loss_after": like.new_tensor(result.loss_after),
            "kl": like.new_tensor(result.kl),
            "line_search_tries": like.new_tensor(float(result.tries)),
            "step_accepted": like.new_tensor(float(result.accepted)),
        })
