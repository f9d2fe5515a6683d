"""`metalearn_cli.batch_norm`: batch norm with a hand-written double backward gives PyTorch's batch norm, its
gradient, its second derivatives (what second-order MAML differentiates) and its third, in float64."""

import pytest
import torch
import torch.nn.functional as F

from metalearn_cli.batch_norm import batch_norm


def _inputs():
    torch.manual_seed(0)
    x = (torch.randn(3, 4, 5, 5, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    weight = torch.randn(4, dtype=torch.float64).requires_grad_(True)
    bias = torch.randn(4, dtype=torch.float64).requires_grad_(True)
    return x, weight, bias


def _torch(x, weight, bias):
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)


def _written_out(x, weight, bias):
    """Batch norm as plain autograd operations (PyTorch's fused kernel has no third derivative)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) * torch.rsqrt(var + 1e-5) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def _ours(x, weight, bias):
    return batch_norm(x, weight, bias, 1e-5)


def _meta_gradient(norm, x, weight, bias):
    """A MAML-like second-order quantity: a loss of the first gradients (all three kinds of cotangent nonzero)."""
    y = norm(x, weight, bias)
    loss = (y.sin() * torch.linspace(0, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
    dx, dweight, dbias = torch.autograd.grad(loss, (x, weight, bias), create_graph=True)
    outer = (dx.cos() * 0.3).sum() + (dweight ** 2).sum() + (dbias * torch.arange(4.0, dtype=y.dtype)).sum() + (dx * x).sum()
    return torch.autograd.grad(outer, (x, weight, bias), create_graph=True)


def test_forward_gradient_and_second_derivatives_are_pytorchs():
    x, weight, bias = _inputs()
    torch.testing.assert_close(_ours(x, weight, bias), _torch(x, weight, bias), rtol=0, atol=0)
    for ours, theirs in zip(_meta_gradient(_ours, x, weight, bias), _meta_gradient(_torch, x, weight, bias)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_gradcheck_gradgradcheck_and_a_third_derivative():
    x, weight, bias = _inputs()
    assert torch.autograd.gradcheck(_ours, (x, weight, bias))
    assert torch.autograd.gradgradcheck(_ours, (x, weight, bias))
    ours = sum(g.pow(2).sum() for g in _meta_gradient(_ours, x, weight, bias))
    theirs = sum(g.pow(2).sum() for g in _meta_gradient(_written_out, x, weight, bias))
    for a, b in zip(torch.autograd.grad(ours, (x, weight, bias)), torch.autograd.grad(theirs, (x, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("missing", ["dx", "dweight", "dbias"])
def test_unused_first_gradients(missing):
    """A second-order loss that uses only some of (dx, dweight, dbias): the others' cotangents are None."""
    x, weight, bias = _inputs()
    results = []
    for norm in (_ours, _torch):
        grads = dict(zip(("dx", "dweight", "dbias"), torch.autograd.grad(norm(x, weight, bias).pow(3).sum(), (x, weight, bias), create_graph=True)))
        outer = sum(g.sin().sum() for name, g in grads.items() if name != missing)
        results.append(torch.autograd.grad(outer, (x, weight, bias), allow_unused=True, materialize_grads=True))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
