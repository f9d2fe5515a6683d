"""A network seen as a pure function of its parameters, for T tasks at once.

`FunctionalModel` wraps an `nn.Module`: `params()` is the initialisation theta, `inner_keys` names
the parameters an inner loop may adapt, and `on(kernel)` gives a `TaskModel`, the function
(params [T, *shape], x [T, N, ...]) -> [T, N, out] that tasks call. How that function runs is the
kernel, chosen beneath every algorithm by `metalearn_cli.execution.Execution`:

* `batched`: `metalearn_cli.batched.batched_forward`, T networks as one pass of ordinary batched
  tensor operations (grouped convolutions, batched matrix products);
* `vmap`: `torch.func.vmap` of `functional_call`, for any module;
* `loop`: `functional_call` task after task.

All three are plain autograd functions of `params`, so an inner loop differentiates them with
`torch.autograd.grad` (and, for MAML, the outer loop differentiates through that).

A pruned network carries its masks (`pruning`, `metalearn_cli.masks`); `masked(params)` zeroes the
pruned entries, which `adapt` does after every inner step, so no algorithm needs to know of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metalearn_cli import batched
from metalearn_cli.masks import ParameterMasks
from metalearn_cli.models import MetaBatchNorm2d

Params = dict[str, Tensor]

#: algo.inner_params: which parameters an inner loop adapts (see FunctionalModel.inner_keys)
INNER_PARAMS = ("all", "no_bn", "head")


class FunctionalModel:
    """An `nn.Module` used as the pure function f(params, x)."""

    def __init__(self, module: nn.Module, pruning: ParameterMasks | None = None) -> None:
        self.module = module
        #: batch-norm layers with running statistics (modes frozen and per_step)
        self.stat_layers = [m for m in module.modules() if isinstance(m, MetaBatchNorm2d) and m.mode != "transductive"]
        #: the pruning masks every inner and outer update keeps (`metalearn_cli.masks`); None: a dense network
        self.pruning = pruning

    def params(self) -> Params:
        return dict(self.module.named_parameters())

    @property
    def masks(self) -> dict[str, Tensor]:
        """name -> boolean mask (False: the weight is pruned) of the masked parameters; {} for a dense network."""
        return {} if self.pruning is None else self.pruning.by_name()

    def masked(self, params: Params) -> Params:
        """`params` (shared [*shape] or per-task [T, *shape]) with the pruned entries set to zero."""
        masks = self.masks
        if not masks:
            return params
        return {k: v * masks[k] if k in masks else v for k, v in params.items()}

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

    def __call__(self, params: Params, x: Tensor, step: int = 0, features_only: bool = False) -> Tensor:
        """One network, unbatched: x [N, ...] with params[name] of the parameter's own shape."""
        self._set_step(step)
        return functional_call(self.module, (params, dict(self.module.named_buffers())), (x,), {"features_only": features_only} if features_only else {})

    def _set_step(self, step: int) -> None:
        for layer in self.stat_layers:
            layer.step = step

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Forward passes of the module's own layers update the running batch-norm statistics (the
        `loop` kernel or a plain call; never inside a transform or the inner loop's graph)."""
        for layer in self.stat_layers:
            layer.recording = True
        try:
            yield
        finally:
            for layer in self.stat_layers:
                layer.recording = False

    def on(self, kernel: str) -> "TaskModel":
        return TaskModel(self, kernel)


class TaskModel:
    """The function (params [T, ...], x [T, N, ...], step) -> [T, N, out] of one kernel."""

    def __init__(self, fmodel: FunctionalModel, kernel: str) -> None:
        if kernel not in ("batched", "vmap", "loop"):
            raise ValueError(f"unknown kernel {kernel!r}; allowed: batched, vmap, loop")
        if kernel == "batched" and not batched.supports(fmodel.module):
            raise ValueError(f"algo.vectorize=batched does not support {type(fmodel.module).__name__}; use vmap or loop")
        self.fmodel = fmodel
        self.module = fmodel.module
        self.kernel = kernel

    def __call__(self, params: Params, x: Tensor, step: int = 0, features_only: bool = False) -> Tensor:
        if self.kernel == "batched":
            return batched.batched_forward(self.module, params, x, step, features_only=features_only)
        one = lambda p, xi: self.fmodel(p, xi, step, features_only)  # noqa: E731
        if self.kernel == "vmap":
            return vmap(one)(params, x)
        return torch.stack([one({k: v[t] for k, v in params.items()}, x[t]) for t in range(x.shape[0])])
