"""Batch normalisation with batch statistics, whose double backward is written by hand.

Second-order MAML differentiates the inner loop's backward: for batch norm, the backward of
`native_batch_norm_backward`. PyTorch's generic formula for it builds about eleven activation-sized
products; written out for the case at hand it needs five per-channel reductions and two fused
linear combinations (derivation in docs/speed-and-memory.md, "Batch norm's double backward"):

    x^ = (x - mean) / sigma, with v, a, b the cotangents of (dx, dweight, dbias) and E[.] the mean
    over the batch and spatial positions of a channel (M of them):
    d/dg      = (weight / sigma) (v - E[v] - x^ E[v x^]) + a x^ + b
    d/dweight = (M / sigma) (E[v g] - E[v] E[g] - E[v x^] E[g x^])
    d/dx      = c_v v + c_g g + c_x x^ + c_0, with per-channel c_* from the same five means.

`batch_norm(x, weight, bias, eps)` computes what `F.batch_norm(x, None, None, weight, bias, True, 0.0,
eps)` computes, with the same forward and first backward (PyTorch's fused kernels). A third derivative
(a backward through the double backward) is exact too: the double backward is plain autograd on its
inputs, recomputing the statistics from x when a graph of it is being built.
"""

from __future__ import annotations

import torch
from torch import Tensor

_DIMS = (0, 2, 3)


def _channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """x [N, C, H, W] normalised with its own per-channel statistics (biased variance), then scaled and shifted."""
    return _BatchNorm.apply(x, weight, bias, eps)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)[:3]
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = _BatchNormBackward.apply(g, x, weight, mean, invstd, ctx.eps)
        return dx, dweight, dbias, None


class _BatchNormBackward(torch.autograd.Function):
    """(g, x, weight) -> (dx, dweight, dbias) of batch norm; mean and invstd are x's statistics, passed
    along (not differentiated: their dependence on x is in the formulas)."""

    @staticmethod
    def forward(ctx, g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, eps: float):
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(g, x, weight, mean, invstd)
        ctx.eps = eps
        return dx, dweight, dbias

    @staticmethod
    def backward(ctx, v: Tensor | None, a: Tensor | None, b: Tensor | None):
        g, x, weight, mean, invstd = ctx.saved_tensors
        m = x.numel() // x.shape[1]
        if torch.is_grad_enabled():  # a graph of this is wanted (third order): statistics as functions of x
            mean = x.mean(_DIMS)
            invstd = torch.rsqrt((x - _channel(mean)).pow(2).mean(_DIMS) + ctx.eps)
        v = torch.zeros_like(x) if v is None else v
        a = torch.zeros_like(weight) if a is None else a
        b = torch.zeros_like(weight) if b is None else b
        # five per-channel means; E[v x^] and E[g x^] from E[v x] and E[g x], so x^ is never formed
        ev, eg = v.mean(_DIMS), g.mean(_DIMS)
        evx = ((v * x).mean(_DIMS) - mean * ev) * invstd
        egx = ((g * x).mean(_DIMS) - mean * eg) * invstd
        evg = (v * g).mean(_DIMS)
        scale = weight * invstd
        k = scale * invstd  # weight / sigma^2; the formulas' M factors cancel with the means'
        grad_weight = m * invstd * (evg - ev * eg - evx * egx)
        # each gradient a per-channel linear combination of v, g and x^ = (x - mean) invstd, x^ folded into x
        g_x = (a - scale * evx) * invstd  # d/dg = scale v + (a - scale E[v x^]) x^ + b - scale E[v]
        grad_g = torch.addcmul(_channel(b - scale * ev - g_x * mean), _channel(g_x), x).addcmul_(_channel(scale), v)
        c_v = -k * egx
        c_g = -k * evx + a * invstd
        c_x = (-k * (evg - ev * eg - evx * egx) + 2 * k * egx * evx - a * invstd * egx) * invstd
        c_0 = k * egx * ev + k * evx * eg - a * invstd * eg - c_x * mean
        grad_x = torch.addcmul(_channel(c_0), _channel(c_x), x).addcmul_(_channel(c_v), v).addcmul_(_channel(c_g), g)
        return grad_g, grad_x, grad_weight, None, None, None
