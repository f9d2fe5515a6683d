"""Functional optimizers for inner loops: params and state in, new params and state out.

No tensor is updated in place, so the same code runs per task in a Python loop or under
`torch.func.vmap` over the tasks of a meta-batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils._pytree import tree_map

Params = dict[str, torch.Tensor]


class InnerSGD:
    """SGD as in torch.optim.SGD (dampening 0, no Nesterov). `lr`: one step size, or one per step (a
    sequence whose last entry repeats for later steps: the MAML paper adapts its policies at test time
    with 0.1, then 0.05)."""

    def __init__(self, lr: float | Sequence[float], momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay

    def rate(self, step: int) -> float:
        """The step size of step `step` (0-based) of an adaptation."""
        if isinstance(self.lr, (list, tuple)):
            return self.lr[min(step, len(self.lr) - 1)]
        return self.lr

    def init(self, params: Params) -> dict:
        return {"buffer": None, "t": 0}

    def step(self, params: Params, grads: Params, state: dict) -> tuple[Params, dict]:
        """params and grads may be nested dicts of tensors (same structure)."""
        lr = self.rate(state["t"])
        if self.weight_decay:
            grads = tree_map(lambda g, p: g + self.weight_decay * p, grads, params)
        buffer = state["buffer"]
        if self.momentum:
            grads = grads if buffer is None else tree_map(lambda b, g: self.momentum * b + g, buffer, grads)
            buffer = grads
        return tree_map(lambda p, g: p - lr * g, params, grads), {"buffer": buffer, "t": state["t"] + 1}


class InnerAdam:
    """Adam as in torch.optim.Adam (no weight decay); Reptile's inner loop uses betas (0, 0.999).

    `start`, if given, is the state every adaptation starts from, {"t": int, "m": {...}, "v": {...}}
    with one tensor per parameter (broadcast to per-task parameters): Reptile's carried state
    (`algo.inner_state=carry`). Without it each adaptation starts from zero moments at t = 0."""

    def __init__(self, lr: float, betas: Sequence[float] = (0.0, 0.999), eps: float = 1e-8, start: dict | None = None) -> None:
        self.lr = lr
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = eps
        self.start = start

    def init(self, params: Params) -> dict:
        if self.start is not None:
            return {
                "t": self.start["t"],
                "m": {k: self.start["m"][k].expand_as(p) for k, p in params.items()},
                "v": {k: self.start["v"][k].expand_as(p) for k, p in params.items()},
            }
        return {
            "t": 0,
            "m": {k: torch.zeros_like(p) for k, p in params.items()},
            "v": {k: torch.zeros_like(p) for k, p in params.items()},
        }

    def step(self, params: Params, grads: Params, state: dict) -> tuple[Params, dict]:
        t = state["t"] + 1
        m = {k: self.beta1 * state["m"][k] + (1 - self.beta1) * g for k, g in grads.items()}
        v = {k: self.beta2 * state["v"][k] + (1 - self.beta2) * g * g for k, g in grads.items()}
        bias1 = 1 - self.beta1**t
        bias2 = 1 - self.beta2**t
        new = {
            k: p - self.lr * (m[k] / bias1) / ((v[k] / bias2).sqrt() + self.eps) for k, p in params.items()
        }
        return new, {"t": t, "m": m, "v": v}


#: algo.inner_optimizer / algo.eval_inner_optimizer (Reptile)
INNER_OPTIMIZERS = ("sgd", "adam")


def make_inner_optimizer(name: str, lr: float, betas: Sequence[float] = (0.0, 0.999), start: dict | None = None):
    """`start`: Adam's carried state (ignored by SGD, which has none without momentum)."""
    if name == "sgd":
        return InnerSGD(lr)
    if name == "adam":
        return InnerAdam(lr, betas, start=start)
    raise ValueError(f"unknown inner optimizer {name!r}; allowed: sgd, adam")


class LearnedSGD:
    """SGD with learned step sizes: p - rate[name] * g, `rate[name]` a tensor broadcast against the
    parameter (one entry per parameter entry for Meta-SGD), or, with `per_step`, a [steps] tensor
    indexed by the step (one scalar per layer and step for MAML++'s LSLR; later steps reuse the
    last). The rates may require grad: the meta-gradient then reaches them through the update."""

    def __init__(self, rates: dict[str, torch.Tensor], per_step: bool = False) -> None:
        self.rates = rates
        self.per_step = per_step

    def init(self, params: Params) -> dict:
        return {"t": 0}

    def step(self, params: Params, grads: Params, state: dict) -> tuple[Params, dict]:
        t = state["t"]
        out = {}
        for k, p in params.items():
            rate = self.rates[k]
            if self.per_step:
                rate = rate[min(t, rate.shape[0] - 1)]
            out[k] = p - rate * grads[k]
        return out, {"t": t + 1}
