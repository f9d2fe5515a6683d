"""Many copies of a network at once: the forward pass of T tasks, each with its own parameters.

`batched_forward(model, params, x)` computes, for every task t, model(x[t]) with parameters
params[name][t], in one pass of ordinary batched tensor operations: per-task linear layers are
batched matrix products, per-task convolutions are one grouped convolution (groups = T) on a
[N, T*C, H, W] layout, batch norm takes per-task statistics. It is plain autograd: the inner loop
differentiates it with torch.autograd.grad(create_graph=True) and the outer loop backpropagates
through that, giving the exact MAML meta-gradient with a few dozen autograd nodes for the whole
meta-batch instead of a few dozen per task (the per-task loop) or per-op batching rules (vmap).

Supported: the networks of `metalearn_cli.models` (MLP, Conv4) built from Linear, Conv2d,
MetaBatchNorm2d, ReLU, MaxPool2d and Flatten, and the Gaussian policy (GaussianMLP: an MLP giving the
action mean, whose `log_std` parameter the tasks read themselves). `supports(model)` says whether a model qualifies;
other models run with vmap or the loop (see `metalearn_cli.execution`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn_cli.batch_norm import batch_norm
from metalearn_cli.models import MLP, Conv4, GaussianMLP, MetaBatchNorm2d

Params = dict[str, Tensor]


def supports(model: nn.Module) -> bool:
    return type(model) in (MLP, GaussianMLP, Conv4)


def expand(params: Params, tasks: int) -> Params:
    """The shared initialisation as T per-task parameter views (no copy)."""
    return {k: v.expand(tasks, *v.shape) for k, v in params.items()}


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [T, N, in], weight [T, out, in], bias [T, out] -> [T, N, out]."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _conv(x: Tensor, weight: Tensor, bias: Tensor, conv: nn.Conv2d, tasks: int) -> Tensor:
    """x [N, T*C, H, W] -> [N, T*O, H', W'] with a per-task kernel: one grouped convolution."""
    return F.conv2d(
        x, weight.reshape(-1, *weight.shape[2:]), bias.reshape(-1), conv.stride, conv.padding, groups=tasks
    )


def _batch_norm(x: Tensor, layer: MetaBatchNorm2d, weight: Tensor, bias: Tensor, tasks: int, step: int) -> Tensor:
    """x [N, T*C, H, W]; statistics per task and channel (as MetaBatchNorm2d on each task alone).

    In this layout every (task, channel) pair is a channel of its own, so PyTorch's fused batch norm
    over dims (N, H, W) computes exactly the per-task statistics; `metalearn_cli.batch_norm` gives it a
    double backward written for the case (second-order MAML's costliest node after the convolutions).
    """
    if layer.mode == "transductive" or layer.training:
        return batch_norm(x, weight.reshape(-1), bias.reshape(-1), layer.eps)
    layer.step = step
    slot = layer._slot()
    mean = layer.running_mean[slot].repeat(tasks)
    var = layer.running_var[slot].repeat(tasks)
    return F.batch_norm(x, mean, var, weight.reshape(-1), bias.reshape(-1), False, 0.0, layer.eps)


def batched_forward(model: nn.Module, params: Params, x: Tensor, step: int = 0, features_only: bool = False) -> Tensor:
    """x [T, N, *input_shape] -> [T, N, out] with params[name] of shape [T, *shape]
    (features_only: the features the head would see, [T, N, F])."""
    tasks = x.shape[0]
    if isinstance(model, MLP):
        h = x.flatten(2)
        linears = [(name, m) for name, m in model.body.named_children() if isinstance(m, nn.Linear)]
        for name, _ in linears:
            h = torch.relu(_linear(h, params[f"body.{name}.weight"], params[f"body.{name}.bias"]))
        return h if features_only else _linear(h, params["head.weight"], params["head.bias"])
    if isinstance(model, Conv4):
        n = x.shape[1]
        h = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])  # [N, T*C, H, W]
        for name, layer in model.features.named_children():
            prefix = f"features.{name}"
            if isinstance(layer, nn.Conv2d):
                h = _conv(h, params[f"{prefix}.weight"], params[f"{prefix}.bias"], layer, tasks)
            elif isinstance(layer, MetaBatchNorm2d):
                h = _batch_norm(h, layer, params[f"{prefix}.weight"], params[f"{prefix}.bias"], tasks, step)
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
            elif isinstance(layer, nn.MaxPool2d):
                h = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding)
            else:
                raise TypeError(f"batched_forward: unsupported layer {type(layer).__name__}")
        h = h.view(n, tasks, -1, *h.shape[2:])  # [N, T, C, H, W]
        h = h.mean(dim=(-2, -1)) if model.pool == "mean" else h.flatten(2)  # [N, T, F]
        h = h.transpose(0, 1)
        return h if features_only else _linear(h, params["head.weight"], params["head.bias"])
    raise TypeError(f"batched_forward does not support {type(model).__name__}")
