"""The linear feature baseline (rllab's LinearFeatureBaseline), fitted to each task's own episodes.

Features of the observation s_t at step t of an episode: clip(s, -10, 10), its square, t/100, (t/100)^2,
(t/100)^3 and 1. The coefficients solve the regularised normal equations
(F^T F + c I) w = F^T R for the discounted returns R over the steps the task's episodes took (padding
after an episode ended is excluded), by `torch.linalg.lstsq` in float64; where the solution is not
finite, c is multiplied by 10 and the fit repeated, up to 5 times as rllab does, after which the task's
baseline is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: rllab's reg_coeff, and how many times it is multiplied by 10 while the fit is not finite
REGULARISATION = 1e-5
TRIES = 5
#: observations are clipped to +-this before they become features
OBS_CLIP = 10.0
#: the time feature is the step index over this (rllab's constant, whatever the horizon)
TIME_SCALE = 100.0


def features(observations: Tensor) -> Tensor:
    """[T, B, H, obs] -> [T, B, H, 2 obs + 4]."""
    obs = observations.clamp(-OBS_CLIP, OBS_CLIP)
    horizon = observations.shape[2]
    t = (torch.arange(horizon, dtype=obs.dtype, device=obs.device) / TIME_SCALE).view(1, 1, horizon, 1)
    t = t.expand(*obs.shape[:3], 1)
    return torch.cat([obs, obs.pow(2), t, t.pow(2), t.pow(3), torch.ones_like(t)], dim=-1)


def fit(feats: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Per-task coefficients [T, F] from features [T, B, H, F], returns and mask [T, B, H]."""
    tasks, size = feats.shape[0], feats.shape[-1]
    f = (feats * mask.unsqueeze(-1)).reshape(tasks, -1, size).double()
    r = (returns * mask).reshape(tasks, -1, 1).double()
    gram, target = f.transpose(1, 2) @ f, f.transpose(1, 2) @ r
    eye = torch.eye(size, dtype=gram.dtype, device=gram.device)
    coeffs = torch.zeros(tasks, size, dtype=gram.dtype, device=gram.device)
    todo = torch.ones(tasks, dtype=torch.bool, device=gram.device)
    regularisation = REGULARISATION
    for _ in range(TRIES):
        index = todo.nonzero().squeeze(1)
        solution = torch.linalg.lstsq(gram[index] + regularisation * eye, target[index]).solution.squeeze(-1)
        finite = torch.isfinite(solution).all(-1)
        coeffs[index[finite]] = solution[finite]
        todo[index[finite]] = False
        if not todo.any():
            break
        regularisation *= 10
    return coeffs.to(feats.dtype)


def predict(feats: Tensor, coeffs: Tensor) -> Tensor:
    """[T, B, H]: the baseline's value of each step."""
    return (feats * coeffs.view(coeffs.shape[0], 1, 1, -1)).sum(-1)


def linear_baseline(observations: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """[T, B, H]: the values of the baseline fitted to these episodes' discounted returns, per task."""
    feats = features(observations)
    return predict(feats, fit(feats, returns, mask)) * mask
