"""Discounted sums and generalised advantage estimation (Schulman et al. 2016) over padded episodes,
as rllab's `process_samples` computes them for one task's paths."""

from __future__ import annotations

from torch import Tensor


def discounted_cumsum(values: Tensor, discount: float, mask: Tensor) -> Tensor:
    """[..., H] -> [..., H]: out_t = sum_{k >= t} discount^(k - t) values_k over the steps of the episode
    (mask 1); 0 after it."""
    values = values * mask
    out = values.clone()
    running = values[..., -1]
    for t in range(values.shape[-1] - 2, -1, -1):
        running = values[..., t] + discount * running
        out[..., t] = running
    return out * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """[..., H] advantages: the (gamma * lam)-discounted sums of the TD residuals
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t), with V = 0 after the episode's last step (as rllab appends
    a 0 to each path's baselines, whether it ended at the goal or at the horizon)."""
    values = values * mask
    following = values.new_zeros(values.shape)
    following[..., :-1] = values[..., 1:] * mask[..., 1:]
    deltas = rewards + gamma * following - values
    return discounted_cumsum(deltas, gamma * lam, mask)


def normalized(advantages: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """[T, ...] advantages centred and scaled per task over the steps taken: (A - mean) / (std + eps),
    std the population standard deviation (rllab's `center_advantages` on one task's samples)."""
    dims = tuple(range(1, advantages.dim()))
    count = mask.sum(dims, keepdim=True).clamp(min=1)
    mean = (advantages * mask).sum(dims, keepdim=True) / count
    var = ((advantages - mean).pow(2) * mask).sum(dims, keepdim=True) / count
    return (advantages - mean) / (var.sqrt() + eps) * mask
